"""Sampling parameters and the one logits -> probabilities transform every level applies.

Greedy, temperature / top-k / top-p, and seeded sampling by position-keyed Gumbel-max
noise: the token at absolute position `pos` of a seeded request is
`argmax(log p + G(seed, pos))`, whichever model, chain, batch or machine computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns a model's logits into tokens.

    temperature 0 is greedy (argmax); top_k 0 and top_p 1 disable those filters; a seed
    makes sampling a deterministic function of (seed, prompt, target model).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def seeded(self) -> bool:
        """Sampling whose randomness is keyed by (seed, position): verified by Gumbel-max."""
        return not self.greedy and self.seed is not None


GREEDY = SamplingParams()


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [..., V] (float32) from logits [..., V]: temperature, top-k, top-p, softmax.

    Greedy requests get the plain softmax (temperature 1): its argmax is the greedy token
    and its value there is the draft's confidence.
    """
    x = logits.float()
    if params.greedy:
        return torch.softmax(x, dim=-1)
    if params.temperature != 1.0:
        x = x / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly above each token
        drop_sorted = before >= params.top_p  # keeps the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return torch.softmax(x, dim=-1)


def process_rows(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """`process_logits` on a batch [B, ..., V] whose rows may carry different parameters."""
    first = params[0]
    if all(p == first for p in params):
        return process_logits(logits, first)
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for row, p in enumerate(params):
        out[row] = process_logits(logits[row], p)
    return out


def _mix(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): independent 63-bit generator seeds per position."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def gumbel_noise(seed: int, positions: Sequence[int], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gumbel(0, 1) noise [len(positions), V] that depends only on (seed, absolute position).

    Drawn on the CPU so every device and every level sees bit-identical noise.
    """
    out = torch.empty(len(positions), vocab_size, dtype=torch.float32)
    gen = torch.Generator()
    for row, pos in enumerate(positions):
        gen.manual_seed(_mix(seed, int(pos)))
        out[row].uniform_(generator=gen)
    out.clamp_(min=1e-20).log_().neg_().clamp_(min=1e-20).log_().neg_()
    return out.to(device)


def gumbel_argmax(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`argmax(log p + G)` along the last axis: one exact sample from each row of `probs`."""
    return torch.argmax(torch.log(probs) + noise.to(probs.device), dim=-1)


def choose(probs: torch.Tensor, params: SamplingParams, positions: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` [n, V] at the given absolute positions, as `params` says."""
    if params.greedy:
        return torch.argmax(probs, dim=-1)
    if params.seeded:
        return gumbel_argmax(probs, gumbel_noise(params.seed, positions, probs.shape[-1]))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
