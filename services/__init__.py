"""SpecMesh's services: gateway, router, state and the model worker (drafter, verifier, target)."""
