"""SpecMesh's shared Python code: settings, messages, the engine, the model family, the stack."""
