"""Acceptance and timing statistics of a chain, and the BRIEF's speedup model.

Per level: tokens drafted (proposed to the level above), accepted, acceptance per draft
position (vLLM's `num_accepted_tokens_per_pos`), verifications, forwards, seconds.
`expected_tokens`, `fit_alpha` and `chain_cost` are the formulas of BRIEF section 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LevelStats:
    """What one level of a chain did."""

    name: str
    drafted: int = 0  # tokens this level proposed to the level above
    accepted: int = 0  # of those, accepted by the level above
    accepted_per_pos: list[int] = field(default_factory=list)  # accepted at draft position j
    drafted_per_pos: list[int] = field(default_factory=list)
    proposals: int = 0  # non-empty drafts it handed to the level above
    rounds: int = 0  # verifications this level ran (one per request per round, with or without drafts)
    forwards: int = 0  # model forward passes (propose steps + scores)
    seconds: float = 0.0  # time in this level's own operations
    step_seconds: float = 0.0  # forward time only (for the cost model)
    overlap: float = 0.0  # sum of 1 - TV(p, q) over sampled draft positions
    overlap_positions: int = 0

    def record(self, drafted: int, accepted: int, overlap: float = 0.0, overlap_positions: int = 0) -> None:
        self.proposals += 1
        self.drafted += drafted
        self.accepted += accepted
        self.overlap += overlap
        self.overlap_positions += overlap_positions
        while len(self.drafted_per_pos) < drafted:
            self.drafted_per_pos.append(0)
            self.accepted_per_pos.append(0)
        for j in range(drafted):
            self.drafted_per_pos[j] += 1
        for j in range(accepted):
            self.accepted_per_pos[j] += 1

    @property
    def acceptance(self) -> float | None:
        """Accepted / drafted (None when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def expected_acceptance(self) -> float | None:
        """Mean 1 - TV(p, q) over the sampled draft positions (None under greedy decoding)."""
        return self.overlap / self.overlap_positions if self.overlap_positions else None

    @property
    def step_time(self) -> float | None:
        """Mean seconds per forward."""
        return self.step_seconds / self.forwards if self.forwards else None

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": self.acceptance,
            "acceptance_per_pos": [a / d if d else None for a, d in zip(self.accepted_per_pos, self.drafted_per_pos)],
            "expected_acceptance": None if self.expected_acceptance is None else round(self.expected_acceptance, 4),
            "proposals": self.proposals,
            "rounds": self.rounds,
            "forwards": self.forwards,
            "seconds": round(self.seconds, 6),
            "step_ms": None if self.step_time is None else round(self.step_time * 1e3, 4),
        }


@dataclass
class ChainStats:
    """A chain's run: its levels (bottom first), tokens emitted and wall time."""

    levels: list[LevelStats]
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "seconds": round(self.seconds, 6),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "levels": [lv.as_dict() for lv in self.levels],
        }


def expected_tokens(alpha: float, k: float) -> float:
    """E(alpha, k) = (1 - alpha^(k+1)) / (1 - alpha): tokens emitted per verification."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def fit_alpha(accepted_per_round: float, k: float) -> float:
    """The alpha whose geometric model accepts `accepted_per_round` of `k` drafts on average."""
    target = accepted_per_round + 1.0
    if k <= 0 or accepted_per_round <= 0:
        return 0.0
    if target >= k + 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_tokens(mid, k) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def chain_cost(step_times: list[float], ks: list[float], alphas: list[float]) -> float:
    """tau_N: seconds per emitted token of a chain (BRIEF section 3, sequential).

    step_times t_1..t_N (bottom first), ks[i] and alphas[i] for the pair (i, i + 1):
    tau_1 = t_1, tau_{i+1} = (k_i tau_i + t_{i+1}) / E(alpha_{i,i+1}, k_i).
    """
    tau = step_times[0]
    for t_next, k, alpha in zip(step_times[1:], ks, alphas):
        tau = (k * tau + t_next) / expected_tokens(alpha, k)
    return tau


def theoretical_speedup(levels: list[LevelStats], target_alone_step: float) -> float | None:
    """Speedup the BRIEF's sequential model predicts from a run's measured numbers.

    Step time of each level: the mean forward (a model), or seconds per drafted token (a
    model-free level). For each pair (i, i + 1): k_i = tokens drafted per verification,
    alpha fitted so E(alpha, k_i) - 1 = tokens accepted per verification. Compared with
    `target_alone_step`, the target's mean step when decoding alone.
    """
    if len(levels) < 2:
        return 1.0
    steps = []
    for lv in levels:
        if lv.forwards:
            steps.append(lv.step_seconds / lv.forwards)
        else:
            steps.append(lv.seconds / lv.drafted if lv.drafted else 0.0)
    ks, alphas = [], []
    for lower, upper in zip(levels, levels[1:]):
        if not upper.rounds:
            return None
        k = lower.drafted / upper.rounds
        ks.append(k)
        alphas.append(fit_alpha(lower.accepted / upper.rounds, k))
    tau = chain_cost(steps, ks, alphas)
    return target_alone_step / tau if tau > 0 else None
