"""The speculative engine, in one process: sampling, verification, lean runner, chains.

Modules, one noun each: `sampling`, `verify`, `kv_cache`, `llama`, `runner`, `ngram`,
`chain`, `stats`, `build` (chains from the model family). See docs/engine.md.
"""
