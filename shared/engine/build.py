"""Chains from names: `"ngram,drafter,verifier,target"` -> a `Chain` over the model family.

Names: `ngram` (prompt lookup, bottom only), `fused` (both drafters fused per position by
confidence, bottom only), `target`, `verifier`, `drafter` (= `drafter-code`),
`drafter-code`, `drafter-prose`. Models come from
`shared.models.family`; a chain whose models do not share one vocabulary is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from shared.engine.chain import Chain
from shared.engine.ngram import NgramProposer
from shared.engine.runner import Runner, load_runner

CHAIN_NAMES = ("ngram", "fused", "target", "verifier", "drafter", "drafter-code", "drafter-prose")
BOTTOM_ONLY = ("ngram", "fused")
FUSED_PARTS = ("drafter-code", "drafter-prose")


def canonical(name: str) -> str:
    """The family member a chain name stands for (`drafter` is `drafter-code`)."""
    return "drafter-code" if name == "drafter" else name


def models_of(name: str) -> tuple[str, ...]:
    """The family members a chain level runs: none for `ngram`, both drafters for `fused`."""
    if name == "ngram":
        return ()
    return FUSED_PARTS if name == "fused" else (canonical(name),)


def parse_chain(spec: str | Sequence[str]) -> list[str]:
    """Validated level names, bottom first, from `"a,b,c"` or a list."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [n.strip() for n in spec]
    names = [n for n in names if n]
    if not names:
        raise ValueError("a chain needs at least one level, e.g. 'drafter,target'")
    unknown = [n for n in names if n not in CHAIN_NAMES]
    if unknown:
        raise ValueError(f"unknown chain level(s) {', '.join(unknown)}; valid: {', '.join(CHAIN_NAMES)}")
    for name in BOTTOM_ONLY:
        if name in names[1:]:
            raise ValueError(f"{name!r} can only be the first (bottom) level of a chain")
    if len(names) == 1 and names[0] in BOTTOM_ONLY:
        raise ValueError("the last level of a chain must be a model (usually 'target')")
    members = [m for n in names for m in models_of(n)]
    if len(set(members)) != len(members):
        raise ValueError(f"a model appears twice in chain {','.join(names)}")
    return names


class RunnerPool:
    """Loads each model of a family once and hands the same runner to every chain."""

    def __init__(self, family, runner: str = "lean", device: str = "cpu", dtype: str = "float32", max_batch: int = 16,
                 max_len: int = 512, prefix_caching: bool = False):
        self.family = family
        self.kind, self.device, self.dtype = runner, device, dtype
        self.max_batch, self.max_len, self.prefix_caching = max_batch, max_len, prefix_caching
        self._runners: dict[str, Runner] = {}

    def path(self, name: str) -> Path:
        return Path(self.family.path(name))

    def get(self, name: str) -> Runner:
        name = canonical(name)
        if name not in self._runners:
            self._runners[name] = load_runner(self.path(name), self.kind, self.device, self.dtype, self.max_batch,
                                              self.max_len, prefix_caching=self.prefix_caching)
        return self._runners[name]

    def chain(self, spec: str | Sequence[str], **kwargs) -> Chain:
        """A `Chain` over these runners (kwargs go to `Chain`: k, confidence_threshold, leniency...)."""
        from shared.models.family import check_same_vocabulary

        from shared.engine.fused import FusedRunner

        names = parse_chain(spec)
        models = [m for n in names for m in models_of(n)]
        check_same_vocabulary([self.path(n) for n in models])
        levels = []
        for n in names:
            if n == "ngram":
                target = self.get(names[-1])
                levels.append((n, NgramProposer(target.vocab_size, device=target.device)))
            elif n == "fused":
                levels.append((n, FusedRunner(*(self.get(m) for m in FUSED_PARTS))))
            else:
                levels.append((n, self.get(n)))
        return Chain(levels, **kwargs)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path("target")))
