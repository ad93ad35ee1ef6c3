"""Prompt lookup: a model-free proposer that copies what followed the last n-gram before.

It finds the most recent earlier occurrence of the sequence's last n tokens (n from
`max_ngram` down to `min_ngram`) in prompt + output so far and proposes the k tokens that
followed it. It costs no forward, so it is a free bottom level for any chain.

Its "distribution" is one-hot on the proposed token (q(x) = 1). Under rejection sampling
the level above therefore accepts x with min(1, p(x) / 1) = p(x), and on rejection draws
from norm(max(0, p - onehot(x))), i.e. p with x removed; under greedy or seeded
verification only the token matters. Lossless either way: the one-hot row is exactly the
(deterministic) rule that produced the token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from shared.engine.runner import Draft


class NgramProposer:
    """Proposes continuations by n-gram match over each request's own tokens."""

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1, device: torch.device | str = "cpu") -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.device = torch.device(device)

    def lookup(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier match of the context's tail."""
        if k <= 0:
            return []
        n_ctx = len(context)
        for n in range(min(self.max_ngram, n_ctx - 1), self.min_ngram - 1, -1):
            tail = list(context[n_ctx - n :])
            first = tail[0]
            # latest start i < n_ctx - n with context[i:i+n] == tail
            for i in range(n_ctx - n - 1, -1, -1):
                if context[i] == first and list(context[i : i + n]) == tail:
                    return list(context[i + n : i + n + k])
        return []

    def propose(self, contexts: Sequence[Sequence[int]], k: int | Sequence[int]) -> list[Draft]:
        """A draft per request: tokens, one-hot distributions, confidence 1."""
        ks = [k] * len(contexts) if isinstance(k, int) else list(k)
        drafts = []
        for context, kr in zip(contexts, ks):
            tokens = self.lookup(context, kr)
            probs = torch.zeros(len(tokens), self.vocab_size, device=self.device)
            if tokens:
                probs[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
            drafts.append(Draft(tokens, probs, [1.0] * len(tokens)))
        return drafts
