"""Verification of drafted tokens: pure functions on tensors, one request at a time.

Vocabulary (after vLLM's rejection sampler, Leviathan et al. 2023, Chen et al. 2023):

- *draft tokens* x_1..x_k, proposed by the level below, each drawn from a known
  distribution q_j (one-hot for greedy and n-gram drafts);
- *accepted tokens*: the longest prefix of the drafts the verifying level keeps;
- *recovered token*: at the first rejected position, the verifier's replacement, drawn
  from norm(max(0, p - q)) (rejection sampling) or its own argmax (greedy, Gumbel);
- *bonus token*: when all k drafts are accepted, one more token from p_{k+1}, which the
  verifier computed in the same forward.

Every verdict therefore emits between 1 and k + 1 tokens. `Verdict.probs` is, for each
emitted token, the exact distribution it was drawn from (given the tokens before it): p_j
when the level is exact, the effective mixture when it is lenient. The level above verifies
against those rows, which keeps a chain of any length lossless. The target is always exact.

Modes: `verify_greedy` (argmax agreement), `verify_gumbel` (seeded sampling: agreement of
noised argmaxes under shared position-keyed noise) and `verify_rejection` (unseeded
sampling). Leniency (`>= 1`, middle levels only): rejection sampling accepts with
`min(1, l * p(x) / q(x))`; greedy and Gumbel accept a draft ranked within the top `int(l)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from shared.engine.sampling import SamplingParams, gumbel_noise

_TINY = 1e-12


@dataclass
class Verdict:
    """What a verifying level keeps of one request's drafts."""

    tokens: list[int]  # accepted drafts, then one recovered or bonus token
    accepted: int  # how many drafts were accepted (0..k)
    probs: torch.Tensor  # [len(tokens), V]: the distribution each emitted token was drawn from
    drafted: int = 0  # how many drafts there were (k)
    overlap: float = 0.0  # sum over the draft positions of 1 - TV(p, q) = sum_x min(p(x), q(x)) (sampling only)
    overlap_positions: int = 0  # positions that sum covers

    @property
    def bonus(self) -> bool:
        """True when every draft was accepted, so the last token is the bonus token."""
        return self.accepted == self.drafted


def _leading_true(mask: torch.Tensor) -> int:
    """Number of leading True values of a 1-D bool tensor."""
    if mask.numel() == 0:
        return 0
    return int(mask.to(torch.int32).cumprod(0).sum())


def _within_top(scores: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
    """[k] bool: token j ranks within the top `top` of scores[j] (ties favour the draft)."""
    chosen = scores.gather(-1, tokens[:, None])
    return (scores > chosen).sum(-1) < top


def verify_greedy(draft_tokens: torch.Tensor | Sequence[int], target_probs: torch.Tensor, leniency: float = 1.0) -> Verdict:
    """Greedy verification: accept while the draft is the verifier's argmax.

    draft_tokens [k], target_probs [k + 1, V]. With `leniency` l >= 2 (middle levels
    only) a draft within the verifier's top int(l) is accepted.
    """
    drafts = draft_tokens.tolist() if isinstance(draft_tokens, torch.Tensor) else list(draft_tokens)
    k = len(drafts)
    best = torch.argmax(target_probs, dim=-1).tolist()  # [k + 1]
    top = max(1, int(leniency))
    if top == 1:
        a = 0
        while a < k and drafts[a] == best[a]:
            a += 1
    else:
        idx = torch.tensor(drafts, dtype=torch.long, device=target_probs.device)
        a = _leading_true(_within_top(target_probs[:k], idx, top))
    return Verdict(tokens=drafts[:a] + [best[a]], accepted=a, probs=target_probs[: a + 1], drafted=k)


def verify_gumbel(draft_tokens: torch.Tensor, target_probs: torch.Tensor, noise: torch.Tensor, leniency: float = 1.0) -> Verdict:
    """Seeded verification: accept while the draft is the verifier's noised argmax.

    noise [k + 1, V] is the Gumbel noise of the k + 1 absolute positions, shared with the
    drafts (coupled), so the emitted tokens are exactly the verifier's own seeded samples.
    """
    k = draft_tokens.shape[0]
    scores = torch.log(target_probs) + noise.to(target_probs.device)
    best = torch.argmax(scores, dim=-1)
    top = max(1, int(leniency))
    ok = draft_tokens == best[:k] if top == 1 else _within_top(scores[:k], draft_tokens, top)
    a = _leading_true(ok)
    tokens = draft_tokens[:a].tolist() + [int(best[a])]
    return Verdict(tokens=tokens, accepted=a, probs=target_probs[: a + 1], drafted=k)


def _inverse_cdf(dist: torch.Tensor, u: float) -> int:
    """The token at quantile u of the (unnormalised) distribution `dist` [V]."""
    cdf = torch.cumsum(dist, dim=-1)
    idx = int(torch.searchsorted(cdf, (u * cdf[-1]).reshape(1), right=True))
    idx = min(idx, dist.shape[-1] - 1)
    while dist[idx] <= 0 and idx > 0:  # float round-off at the top of the cdf
        idx -= 1
    return idx


def verify_rejection(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    uniform_accept: torch.Tensor,
    uniform_sample: torch.Tensor,
    leniency: float = 1.0,
) -> Verdict:
    """Lossless rejection sampling with recovered and bonus tokens.

    draft_tokens [k], draft_probs q [k, V], target_probs p [k + 1, V];
    uniform_accept [k] and uniform_sample [k + 1] are U(0, 1) draws (the only randomness).
    Draft x_j is accepted when u_j * q_j(x_j) < l * p_j(x_j), i.e. with min(1, l p/q);
    the first rejected position draws from norm(max(0, p_j - q_j)); if all k are
    accepted the bonus token is drawn from p_{k+1}.
    """
    k = draft_tokens.shape[0]
    p, q = target_probs, draft_probs
    if k:
        idx = draft_tokens[:, None]
        p_x = p[:k].gather(-1, idx).squeeze(-1)
        q_x = q.gather(-1, idx).squeeze(-1)
        ok = uniform_accept[:k].to(p.device) * q_x < leniency * p_x
        a = _leading_true(ok)
    else:
        a = 0
    if a < k:
        residual = torch.clamp(p[a] - q[a], min=0.0)
        last = _inverse_cdf(residual if float(residual.sum()) > _TINY else p[a], float(uniform_sample[a]))
    else:
        last = _inverse_cdf(p[k], float(uniform_sample[k]))
    tokens = draft_tokens[:a].tolist() + [last]
    rows = a + 1 if a < k else k + 1
    if leniency == 1.0:
        probs = p[:rows]
    else:
        probs = p[:rows].clone()
        n = min(rows, k)  # the bonus row (if any) is p itself
        probs[:n] = lenient_mixture(p[:n], q[:n], leniency)
    return Verdict(tokens=tokens, accepted=a, probs=probs, drafted=k)


def lenient_mixture(p: torch.Tensor, q: torch.Tensor, leniency: float) -> torch.Tensor:
    """The distribution [.., V] a lenient rejection step emits from: accepted mass + residual.

    r = min(q, l p) + (1 - beta) norm(max(0, p - q)), beta = sum min(q, l p). It equals p for
    l = 1; for l > 1 it leans toward q, and the level above must verify against r.
    """
    kept = torch.minimum(q, leniency * p)
    beta = kept.sum(-1, keepdim=True)
    residual = torch.clamp(p - q, min=0.0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > _TINY, residual / mass.clamp(min=_TINY), p)
    return kept + (1.0 - beta).clamp(min=0.0) * residual


def verify(
    draft_tokens: Sequence[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    params: SamplingParams,
    first_position: int,
    generator: torch.Generator | None = None,
    leniency: float = 1.0,
) -> Verdict:
    """Verify one request's drafts in the mode its sampling parameters call for.

    first_position is the absolute position of the first draft token (the one p_1
    predicts); the bonus position is first_position + k. `generator` supplies the
    uniforms of unseeded rejection sampling.

    The drafter's vocabulary may be wider or narrower than the verifier's (one tokenizer,
    embeddings padded to different sizes: Qwen2.5 0.5B's 151936 rows against 7B's 152064):
    a token past either's size has probability 0 under it. Greedy and seeded verification
    cut the drafts at the first token the verifier cannot emit (rejected there, the
    verifier's own token follows, as it would have); rejection sampling compares both
    distributions over the wider vocabulary, zeros past each one's size.
    """
    V = target_probs.shape[-1]
    if params.greedy or params.seeded:
        draft_tokens = list(draft_tokens)
        cut = next((j for j, t in enumerate(draft_tokens) if t >= V), None)
        if cut is not None:  # rows past the cut's belong to drafts never verified
            draft_tokens, target_probs = draft_tokens[:cut], target_probs[: cut + 1]
            draft_probs = draft_probs[:cut] if draft_probs is not None else None
    if params.greedy:
        return verify_greedy(draft_tokens, target_probs, leniency)
    drafts = torch.as_tensor(list(draft_tokens), dtype=torch.long, device=target_probs.device)
    k = drafts.shape[0]
    if params.seeded:
        noise = gumbel_noise(params.seed, range(first_position, first_position + k + 1), V)
        verdict = verify_gumbel(drafts, target_probs, noise, leniency)
    else:
        uniforms = torch.rand(2 * k + 1, generator=generator)
        q = draft_probs if draft_probs is not None else target_probs.new_zeros((0, V))
        width = max(V, q.shape[-1])
        p = F.pad(target_probs, (0, width - V)) if width > V else target_probs
        q = F.pad(q, (0, width - q.shape[-1])) if width > q.shape[-1] else q
        verdict = verify_rejection(drafts, q.to(p.device), p, uniforms[:k], uniforms[k:], leniency)
        verdict.probs = verdict.probs[:, :V]
    if k and draft_probs is not None and draft_probs.shape[0] == k:
        # Expected acceptance of each drafted position, 1 - TV (BRIEF section 3): the router's
        # second estimate of the pair, sharper than the accept/reject coin flips it summarises.
        q = draft_probs[:, :V].to(target_probs.device)
        verdict.overlap = float(torch.minimum(target_probs[:k, : q.shape[-1]], q).sum())
        verdict.overlap_positions = k
    return verdict
