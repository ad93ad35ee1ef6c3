"""Two drafters fused per position by confidence (CoSine): the bottom level `fused`.

At every draft position both drafters see the same context and give their next-token
distribution; the more confident one (the higher top probability, known before any draw)
proposes the token, drawn from its own distribution, and that distribution is the
proposal q the level above verifies against. Both drafters then take the chosen token as
their next input, so their caches always hold the same sequence.

Lossless: which drafter proposes is a function of the context alone, so each token is
drawn from a distribution q fixed by the context, and rejection sampling against q (or the
greedy / Gumbel checks, which ignore q) keeps the output the target's. It costs two
drafter forwards per position; it pays when requests mix domains and the specialist that
agrees with the target changes within a request.
"""

from __future__ import annotations

from typing import Sequence

import torch

from shared.engine.runner import Runner
from shared.engine.sampling import GREEDY, SamplingParams


class FusedRunner(Runner):
    """A bottom-level proposer over two runners that share a vocabulary; never a verifier."""

    def __init__(self, first: Runner, second: Runner):  # noqa: D107 - no Runner state of its own
        if first.vocab_size != second.vocab_size:
            raise ValueError(f"fused drafters need one vocabulary: {first.vocab_size} vs {second.vocab_size} tokens")
        self.parts = (first, second)
        self.device = first.device
        self.vocab_size = first.vocab_size
        self.max_len = min(first.max_len, second.max_len)
        self.generator = first.generator
        self.chosen = [0, 0]  # positions at which each part was the more confident

    # Counters the chain reads for its stats: the two parts together.
    @property
    def forwards(self) -> int:
        return sum(p.forwards for p in self.parts)

    @property
    def forward_s(self) -> float:
        return sum(p.forward_s for p in self.parts)

    @property
    def forward_tokens(self) -> int:
        return sum(p.forward_tokens for p in self.parts)

    def length(self, request_id: str) -> int:
        return self.parts[0].length(request_id)

    def rollback(self, request_id: str, length: int) -> None:
        for part in self.parts:
            part.rollback(request_id, length)

    def sampling(self, request_id: str) -> SamplingParams:
        return self.parts[0].sampling(request_id)

    def prefill(self, request_id: str, tokens: Sequence[int], sampling: SamplingParams = GREEDY) -> torch.Tensor:
        first = self.parts[0].prefill(request_id, tokens, sampling)
        try:
            second = self.parts[1].prefill(request_id, tokens, sampling)
        except Exception:
            self.parts[0].release(request_id)
            raise
        return first if float(first.max()) >= float(second.max()) else second

    def release(self, request_id: str) -> None:
        for part in self.parts:
            part.release(request_id)

    def score(self, request_ids, chunks):
        raise NotImplementedError("a fused proposer is a bottom level: it proposes and never verifies")

    def _draft_step(self, ids, chunks):
        """Both parts draft one token on the same context; the more confident one's counts."""
        both = [part.propose(ids, chunks, 1) for part in self.parts]
        out = []
        for rid, drafts in zip(ids, zip(*both)):
            tops = [float(d.probs[0].max()) for d in drafts]
            pick = 0 if tops[0] >= tops[1] else 1
            d = drafts[pick]
            params = self.parts[pick].sampling(rid)
            # As in `Runner._draft_step`: unseeded sampling stops on the top probability
            # (known before the draw), greedy and seeded on the chosen token's own.
            score = tops[pick] if not (params.greedy or params.seeded) else d.confidence[0]
            self.chosen[pick] += 1
            out.append((d.tokens[0], d.probs[0], d.confidence[0], score))
        return out
