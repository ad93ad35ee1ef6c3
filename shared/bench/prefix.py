"""The prefix-caching benchmark: chat turns that share heads, with the cache off and on.

A workload of conversations, one after another (batch 1, as a chat user waits): every
first turn is one system text and a question; every second turn is that turn, its answer
and a new question. Each conversation runs on a chain without prefix caching and on the
same chain with it, back to back (so the machine's drift hits both alike). Reported per
mode: time to first token (every level's prefill and the target's first token), time per
output token after it, and the target's prompt tokens read from its cache; and whether
both modes gave the same tokens (they must: a cached head holds what running it would
write).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass
class Turn:
    """One request's measurements."""

    ttft_s: float
    tpot_s: float
    output: list[int]


@dataclass
class Mode:
    """One mode's turns, by turn number (0: first turns, 1: second turns)."""

    turns: dict[int, list[Turn]] = field(default_factory=lambda: {0: [], 1: []})
    queried: int = 0
    hits: int = 0

    def summary(self) -> dict:
        out: dict = {"prompt_tokens": self.queried, "cached_tokens": self.hits,
                     "cached_share": round(self.hits / self.queried, 4) if self.queried else 0.0}
        for n, turns in self.turns.items():
            out[f"turn_{n + 1}"] = {"ttft_ms_p50": round(statistics.median(t.ttft_s for t in turns) * 1e3, 3),
                                    "ttft_ms_mean": round(statistics.fmean(t.ttft_s for t in turns) * 1e3, 3),
                                    "tpot_ms_p50": round(statistics.median(t.tpot_s for t in turns) * 1e3, 3)}
        return out


def run_turn(chain, prompt: Sequence[int], max_tokens: int) -> Turn:
    """One request alone on `chain`: timed to its first token, then to its end."""
    t0 = time.perf_counter()
    request = chain.add(prompt, max_tokens, stop_at_eos=False)
    first = time.perf_counter()
    while not request.done:
        chain.step()
    end = time.perf_counter()
    n = len(request.output)
    return Turn(first - t0, (end - first) / max(n - 1, 1), list(request.output))


def run_prefix_bench(chains: dict[str, object], targets: dict[str, object], system: list[int],
                     questions: list[tuple[list[int], list[int]]], max_tokens: int,
                     progress: Callable[[], None] = lambda: None) -> dict:
    """Every conversation on every chain of `chains` ({"off": ..., "on": ...}), back to
    back; `targets` are their target runners (their prefix counters are read)."""
    modes = {name: Mode() for name in chains}
    start = {name: (targets[name].prefix_queried, targets[name].prefix_hits) for name in chains}
    identical = True
    for first, second in questions:
        outputs = []
        for name, chain in chains.items():
            turn1 = run_turn(chain, system + first, max_tokens)
            turn2 = run_turn(chain, system + first + turn1.output + second, max_tokens)
            modes[name].turns[0].append(turn1)
            modes[name].turns[1].append(turn2)
            outputs.append((turn1.output, turn2.output))
        identical &= all(o == outputs[0] for o in outputs)
        progress()
    for name, mode in modes.items():
        mode.queried = targets[name].prefix_queried - start[name][0]
        mode.hits = targets[name].prefix_hits - start[name][1]
    result = {"conversations": len(questions), "system_tokens": len(system), "max_tokens": max_tokens,
              "modes": {name: mode.summary() for name, mode in modes.items()}, "identical": identical}
    if {"off", "on"} <= set(modes):
        off, on = result["modes"]["off"], result["modes"]["on"]
        result["ttft_speedup"] = {turn: round(off[turn]["ttft_ms_mean"] / on[turn]["ttft_ms_mean"], 3)
                                  for turn in ("turn_1", "turn_2")}
    return result
