"""The model worker: one engine in three roles (drafter, verifier, target)."""
