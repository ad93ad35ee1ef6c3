"""The model creator's sampling defaults (vLLM's `--generation-config auto`).

A checkpoint's `generation_config.json` may recommend how to sample it: Qwen3 says
temperature 0.6, top_p 0.95, top_k 20. A request that leaves such a field out gets the
checkpoint's value instead of OpenAI's default (temperature 1, top_p 1, no top_k); a
request that sets it keeps its own. `max_new_tokens` becomes the default `max_tokens`
(still cut to the context). `do_sample` is not read, as vLLM does not read it.

`gateway.generation_config`: "auto" reads the target's folder, "none" keeps OpenAI's
defaults, any other value is a folder holding a `generation_config.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

FILE = "generation_config.json"


class BadGenerationConfig(ValueError):
    """A generation config the gateway will not start with; names the file and the key."""


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    source: str = ""  # the file they came from; "" when none applies

    @classmethod
    def load(cls, setting: str, target: Path) -> GenerationDefaults:
        """The defaults `setting` names ("auto": `target`'s, "none": none, else a folder)."""
        if setting == "none":
            return cls()
        folder = target if setting == "auto" else Path(setting)
        path = folder / FILE
        if not path.is_file():
            if setting == "auto":
                return cls()  # a checkpoint without one: OpenAI's defaults
            raise BadGenerationConfig(f"gateway.generation_config: {path} does not exist")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadGenerationConfig(f"{path}: not readable JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise BadGenerationConfig(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls(**{name: _checked(path, name, raw.get(name)) for name in _FIELDS}, source=str(path))

    def given(self) -> dict[str, float | int]:
        """The fields the file set, for the startup log line."""
        return {name: getattr(self, name) for name in _FIELDS if getattr(self, name) is not None}


_FIELDS = [f.name for f in fields(GenerationDefaults) if f.name != "source"]
_RANGES = {  # field -> (low, high, low inclusive, what it must be)
    "temperature": (0.0, 2.0, True, "between 0 and 2"),
    "top_p": (0.0, 1.0, False, "greater than 0 and at most 1"),
    "min_p": (0.0, 1.0, True, "between 0 and 1"),
    "repetition_penalty": (0.0, 2.0, False, "greater than 0 and at most 2"),
}


def _checked(path: Path, name: str, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadGenerationConfig(f"{path}: {name} must be a number, got {value!r}")
    if name in ("top_k", "max_new_tokens"):
        if value != int(value) or value < (0 if name == "top_k" else 1):
            raise BadGenerationConfig(f"{path}: {name} must be a whole number {'>= 0' if name == 'top_k' else '>= 1'}, "
                                      f"got {value!r}")
        return int(value)
    low, high, inclusive, what = _RANGES[name]
    if not (low <= value if inclusive else low < value) or value > high:
        raise BadGenerationConfig(f"{path}: {name} must be {what}, got {value!r}")
    return float(value)
