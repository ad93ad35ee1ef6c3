"""Log-probabilities of emitted tokens: what the OpenAI API's `logprobs` reports.

Every token the target emits comes with the row of the target's distribution it was drawn
from (`Verdict.probs`; for the first token, the prefill's last row): the plain softmax under
greedy decoding, the distribution after temperature, top-k and top-p when sampling (what
vLLM calls `processed_logprobs`). Speculation changes nothing here: the rows are the
target's own, computed in its verify forward, and equal the target alone's up to float
round-off. A token the distribution gives no mass (filtered out, or below float32's range)
reports `FLOOR`, as OpenAI does, since JSON has no -infinity.
"""

from __future__ import annotations

from typing import Sequence

import torch

from shared.messages import MAX_TOP_LOGPROBS, TokenLogprob

FLOOR = -9999.0
__all__ = ["FLOOR", "MAX_TOP_LOGPROBS", "TokenLogprob", "logprobs_of"]


def logprobs_of(probs: torch.Tensor, tokens: Sequence[int], top: int, ranks: bool = False) -> list[TokenLogprob]:
    """For tokens[j] drawn from probs[j] ([>= len(tokens), V]): its log-probability and the `top`
    best; with `ranks`, its rank too (a pass over the vocabulary per token: the prompt's only)."""
    n = len(tokens)
    if n == 0:
        return []
    logs = torch.log(probs[:n].float().clamp_min(0.0)).clamp_min(FLOOR)
    picked = logs.gather(-1, torch.tensor(list(tokens), dtype=torch.long, device=logs.device)[:, None])
    rank = ((logs > picked).sum(-1) + 1).tolist() if ranks else [0] * n  # 1: the likeliest (vLLM's); 0: none
    chosen = picked.squeeze(-1).tolist()
    if top <= 0:
        return [TokenLogprob(lp, rank=r) for lp, r in zip(chosen, rank)]
    values, ids = torch.topk(logs, min(top, logs.shape[-1]), dim=-1)
    return [TokenLogprob(lp, i, v, r) for lp, i, v, r in zip(chosen, ids.tolist(), values.tolist(), rank)]
