"""The BRIEF's chain cost (section 3): predicted milliseconds per emitted token of a chain.

    E(a, k)     = (1 - a^(k+1)) / (1 - a)   (i.i.d. acceptance; measured per position when known)
    tau_1       = t_1
    tau_{i+1}   = (k_i tau_i + t_{i+1}) / E(a_{i,i+1}, k_i)
    cost        = tau_N

With what serving adds (SpecServe's goodput view): every step serves the batch B, so a
verification forward of level i+1 writes B (k_i + 1) tokens and its time t_{i+1} is the
model's step time at that many tokens (grows with load; the target alone writes B); a
remote level costs one NATS round trip per call (a middle level's score, the bottom
proposer's call of k drafts), measured against the load; every round of the target also
costs the driver's own work for the batch (commits, streaming, bookkeeping), so that a
chain emitting few tokens per round pays it more often; a bottom proposer that drafts on a fraction p of rounds (an
n-gram finds no match) yields `E' = 1 + p (E(a, k) - 1)` and costs `p k tau_1`. The
prediction is then scaled by the (chain, load) calibration from realised TPOT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.engine.build import FUSED_PARTS

NGRAM_MS = 0.02  # prompt lookup in the driver: no model forward


def expected_tokens(alpha: float, k: int) -> float:
    """E(alpha, k): tokens emitted per verification of k drafts at per-token acceptance alpha."""
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def tau(step_ms: list[float], alphas: list[float], ks: list[int], draft_rates: list[float] | None = None,
        expected: list[float] | None = None) -> float:
    """tau_N for levels bottom first: `step_ms` per level (hops included), acceptances and k per pair.

    `expected` replaces E(alpha, k) per pair when given (tokens per verification measured
    position by position)."""
    rates = draft_rates or [1.0] * len(alphas)
    gains = expected or [expected_tokens(a, k) for a, k in zip(alphas, ks)]
    cost = step_ms[0]
    for t_next, e, k, p in zip(step_ms[1:], gains, ks, rates):
        gain = 1.0 + p * (e - 1.0)
        cost = (p * k * cost + t_next) / gain
    return cost


@dataclass
class Prediction:
    """One candidate (chain, k per level) and its predicted ms/token with every input."""

    chain: tuple[str, ...]
    k: tuple[int, ...]
    ms_per_token: float  # calibrated: what the decision compares
    model_ms: float  # tau_N before calibration
    calibration: float
    batch: float
    inputs: list[tuple] = field(default_factory=list, repr=False)  # per level, raw: see `levels`

    @property
    def levels(self) -> list[dict]:
        """Per level: model, step_ms, tokens_per_forward, hop_ms (remote), driver_ms (top),
        alpha, k, draft_rate, expected_tokens (proposers). Built when shown, not per candidate."""
        out = []
        for model, step, tokens, hop, driver, proposal in self.inputs:
            entry = {"model": model, "step_ms": round(step, 4), "tokens_per_forward": round(tokens, 2)}
            if hop is not None:
                entry["hop_ms"] = round(hop, 4)
            if driver is not None:
                entry["driver_ms"] = round(driver, 4)
            if proposal is not None:
                alpha, k, rate, gain = proposal
                entry.update({"alpha": round(alpha, 4), "k": k, "draft_rate": round(rate, 4),
                              "expected_tokens": round(gain, 4)})
            out.append(entry)
        return out

    def as_dict(self) -> dict:
        return {"chain": ",".join(self.chain), "k": list(self.k), "ms_per_token": round(self.ms_per_token, 4),
                "model_ms": round(self.model_ms, 4), "calibration": round(self.calibration, 4),
                "batch": round(self.batch, 3), "levels": self.levels}


def predict(chain: tuple[str, ...], ks: tuple[int, ...], request_class: str, estimates, batch: float | None = None,
            remote=lambda model: model not in ("ngram", "target"), calibrated: bool = True) -> Prediction:
    """The cost of `chain` with `ks` for `request_class` under the estimates' current load."""
    batch = estimates.batch() if batch is None else batch
    chain = tuple(chain)
    if len(chain) == 1 or not ks or all(k == 0 for k in ks):
        chain, ks = ("target",), ()
    hop = estimates.hop(batch)
    steps, alphas, rates, gains, inputs = [], [], [], [], []
    for i, model in enumerate(chain):
        below_k = ks[i - 1] if i > 0 else 0
        rate_below = rates[i - 1] if i > 0 else 1.0
        tokens = batch * (1 + rate_below * below_k)  # one forward writes the batch's chunks
        if model == "ngram":
            t = NGRAM_MS
        elif model == "fused":  # both drafters step at every position, one call each when remote
            t = sum(estimates.step_ms(part, tokens) + (hop if remote(part) else 0.0) for part in FUSED_PARTS)
        else:
            t = estimates.step_ms(model, tokens)
            if remote(model):
                # bottom: one call per k drafts; above: one call per verification
                t += hop / max(ks[0], 1) if i == 0 else hop
        driver = None
        if i == len(chain) - 1:  # the target's round also pays the driver's own work
            driver = estimates.driver_ms(batch)
            t += driver
        steps.append(t)
        proposal = None
        if i < len(chain) - 1:
            alpha = estimates.alpha(model, chain[i + 1], request_class)
            rate = estimates.draft_rate(model, request_class) if i == 0 else 1.0
            gain = estimates.expected_tokens(model, chain[i + 1], request_class, ks[i])
            alphas.append(alpha)
            rates.append(rate)
            gains.append(gain)
            proposal = (alpha, ks[i], rate, gain)
        inputs.append((model, t, tokens, hop if model == "fused" or remote(model) else None, driver, proposal))
    model_ms = tau(steps, alphas, list(ks), rates, gains)
    factor = estimates.calibration_ratio(chain, batch, tuple(ks)) if calibrated else 1.0
    return Prediction(chain, tuple(ks), model_ms * factor, model_ms, factor, batch, inputs)
