"""`specmesh bench prefix`: the workload runs both modes on the same conversations, the
cached mode reads the shared heads from its cache, and both give the same tokens."""

from __future__ import annotations

import json

import torch

from shared.bench.prefix import Mode, Turn, run_prefix_bench
from shared.engine.build import RunnerPool
from tests.device import DEVICE
from tests.test_engine_chain import engine_family  # noqa: F401 - fixture


def test_both_modes_give_the_same_tokens_and_only_the_cached_one_reads_heads(engine_family):
    torch.set_num_threads(1)
    pools = {name: RunnerPool(engine_family, device=DEVICE, max_batch=4, max_len=256, prefix_caching=name == "on")
             for name in ("off", "on")}
    tok = pools["off"].tokenizer()
    system = tok.encode("The river ran past the old mill, and the town grew up around it over the years.")
    questions = [(tok.encode(a, add_special_tokens=False), tok.encode(b, add_special_tokens=False))
                 for a, b in [("def add(a, b):", "Why?"), ("class Stack:", "And then?")]]
    ticks = []
    result = run_prefix_bench({n: p.chain("drafter,target", k=3) for n, p in pools.items()},
                              {n: p.get("target") for n, p in pools.items()}, system, questions, 6,
                              progress=lambda: ticks.append(1))
    assert result["identical"] and len(ticks) == 2
    off, on = result["modes"]["off"], result["modes"]["on"]
    assert off["cached_tokens"] == 0 and off["prompt_tokens"] == on["prompt_tokens"]
    # every second turn finds its first turn and all of the answer but its last token (never fed);
    # the second conversation's first turn finds the system text
    second_turns = sum(len(system) + len(a) + 6 - 1 for a, _ in questions)
    assert on["cached_tokens"] >= second_turns + len(system)
    assert set(on) >= {"turn_1", "turn_2"} and on["turn_2"]["ttft_ms_p50"] > 0
    assert set(result["ttft_speedup"]) == {"turn_1", "turn_2"}


def test_a_modes_summary_is_its_turns_percentiles():
    mode = Mode()
    mode.turns[0] = [Turn(0.010, 0.002, [1]), Turn(0.030, 0.004, [2]), Turn(0.020, 0.003, [3])]
    mode.turns[1] = [Turn(0.005, 0.001, [1])]
    mode.queried, mode.hits = 200, 150
    s = mode.summary()
    assert s["turn_1"] == {"ttft_ms_p50": 20.0, "ttft_ms_mean": 20.0, "tpot_ms_p50": 3.0}
    assert s["turn_2"]["ttft_ms_p50"] == 5.0 and s["cached_share"] == 0.75
    json.dumps(s)
