"""The state service: authority on each request's committed tokens and epoch."""
