"""What the services will make of the family's checkpoints, before they start (`specmesh models check`).

Per model (the trained profile, or the folders the settings name): its architecture and
size, the runner that will run it (the lean one, or transformers and why), its context
against `engine.max_len`, its end tokens, and the memory its weights and its KV cache take
at the engine's dtype, `max_batch` and `max_len`. For the target: the sampling defaults its
generation config sets (`gateway.generation_config`) and whose chat template renders
chats. Only configs, safetensors headers and JSON files are read; no weights are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.engine.llama import lean_problem, text_part
from shared.models.family import checkpoint_shapes, param_count

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
    return [int(v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]


def model_report(name: str, path: Path, engine) -> dict:
    """One checkpoint: architecture, runner, context, end tokens, memory, and what is wrong with it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    shapes = checkpoint_shapes(path)
    params = param_count(shapes)
    why = lean_problem(config, shapes, engine.max_len) if engine.runner == "lean" else "engine.runner is hf"
    text, _ = text_part(config, shapes)
    layers = getattr(text, "num_hidden_layers", 0)
    heads = getattr(text, "num_attention_heads", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or getattr(text, "hidden_size", 0) // heads
    size = DTYPE_BYTES[engine.dtype]
    eos: list[int] = []
    for token in _ids(getattr(config, "eos_token_id", None)) + _ids(_json(path / "generation_config.json").get("eos_token_id")):
        if token not in eos:
            eos.append(token)
    context = getattr(text, "max_position_embeddings", None)
    problems = []
    if context and engine.max_len > context:
        problems.append(f"engine.max_len={engine.max_len} is longer than its context ({context} positions); set "
                        f"SPECMESH_ENGINE__MAX_LEN to at most {context}")
    if not shapes:
        problems.append("no safetensors weights in the folder")
    return {
        "name": name, "path": str(path), "model_type": config.model_type, "params": params,
        "runner": "lean" if why is None else "hf", "runner_reason": why, "context": context, "eos_token_ids": eos,
        "weights_bytes": params * size,
        # the lean runner's cache: every slot (max_batch, and one scratch) for max_len positions; transformers' grows
        "kv_cache_bytes": 2 * layers * kv_heads * head_dim * (engine.max_batch + 1) * engine.max_len * size,
        "problems": problems,
    }


def check_family(family, settings) -> dict:
    """Every member's report, the target's sampling defaults and chat template, and the problems."""
    from services.gateway.generation_defaults import BadGenerationConfig, GenerationDefaults

    models = [model_report(entry.name, Path(entry.path), settings.engine) for entry in family.models.values()]
    problems = [f"{m['name']}: {p}" for m in models for p in m["problems"]]
    target = Path(family.path("target"))
    try:
        defaults = GenerationDefaults.load(settings.gateway.generation_config, target)
        sampling = {"source": defaults.source or None, "defaults": defaults.given()}
    except BadGenerationConfig as exc:
        sampling = {"source": None, "defaults": {}}
        problems.append(f"target: {exc}")
    own = "chat_template" in _json(target / "tokenizer_config.json") or (target / "chat_template.jinja").is_file()
    template = str(settings.gateway.chat_template) if settings.gateway.chat_template else \
        "the checkpoint's" if own else "the family's `Role: content` lines"
    return {"profile": family.profile, "root": str(family.root), "models": models, "sampling": sampling,
            "chat_template": template, "problems": problems}
