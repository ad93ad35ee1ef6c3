"""The gateway: OpenAI-compatible HTTP API and gRPC in front of the chain."""
