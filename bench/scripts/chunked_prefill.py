"""Chunked prefill in the target's driver, measured in process (no NATS): four requests
decode while a long prompt arrives; the longest gap between two of their decode rounds,
and the long request's time to first token, with `engine.prefill_chunk` off and on.

    .venv/bin/python bench/scripts/chunked_prefill.py [--family tiny] [--prompt-tokens 480] [--chunks 0,64,128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from services.worker.driver import Driver
from shared.engine.build import RunnerPool
from shared.messages import GenerateJob
from shared.models.corpus import heldout_prompts
from shared.models.family import ensure_family
from shared.settings import Settings


class Commits:
    """The committer's part the driver calls: when each request's commits came."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def commit(self, commit, trace=None):
        self.times.setdefault(commit.request_id, []).append(time.perf_counter())

    def forget(self, rid):
        pass

    def when_finished(self, rid, cb):
        pass

    def error(self, batch):
        raise RuntimeError(batch.error)


def run(pool, tok, chunk: int, prompt_tokens: int) -> dict:
    settings = Settings()
    settings.engine.max_batch, settings.engine.prefill_chunk = 6, chunk
    target = pool.get("target")
    d = Driver("bench", target, nc=None, loop=None, settings=settings)
    d.committer = Commits()
    for i, text in enumerate(heldout_prompts("code", 4, 100, seed=11)):
        d.submit(GenerateJob(f"d{i}", tok.encode(text)[-32:], 200))
    d._drain(block=False)
    for _ in range(5):
        d._step()
    long_prompt = tok.encode(" ".join(heldout_prompts("prose", 8, 400, seed=12)))[:prompt_tokens]
    arrived = time.perf_counter()
    d.submit(GenerateJob("long", long_prompt, 8))
    while "long" not in d.committer.times:
        d._drain(block=False)
        d._step()
        d._warm()
    ttft = time.perf_counter() - arrived
    for _ in range(10):
        d._step()
    gaps = [b - a for i in range(4) for a, b in zip(d.committer.times[f"d{i}"], d.committer.times[f"d{i}"][1:])
            if b > arrived]
    for rid in list(d.jobs):
        d._finish(rid)
    return {"chunk": chunk, "long_ttft_ms": ttft * 1e3, "max_gap_ms": max(gaps) * 1e3,
            "median_gap_ms": statistics.median(gaps) * 1e3}


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--family", default="tiny")
    args.add_argument("--prompt-tokens", type=int, default=480)
    args.add_argument("--chunks", default="0,64,128")
    args.add_argument("--repeats", type=int, default=3)
    a = args.parse_args()
    torch.set_num_threads(1)
    pool = RunnerPool(ensure_family(a.family, progress=False), max_batch=8, max_len=512, prefix_caching=True)
    tok = pool.tokenizer()
    run(pool, tok, 0, a.prompt_tokens)  # warm up
    print(f"family={a.family} prompt={a.prompt_tokens} tokens, 4 requests decoding (target alone), 1 thread, "
          f"median of {a.repeats} runs")
    print(f"{'prefill_chunk':>14}{'long TTFT ms':>14}{'max decode gap ms':>19}{'median gap ms':>15}")
    for chunk in [int(c) for c in a.chunks.split(",")]:
        rows = [run(pool, tok, chunk, a.prompt_tokens) for _ in range(a.repeats)]
        med = {k: statistics.median(r[k] for r in rows) for k in ("long_ttft_ms", "max_gap_ms", "median_gap_ms")}
        print(f"{chunk or 'off':>14}{med['long_ttft_ms']:>14.1f}{med['max_gap_ms']:>19.1f}{med['median_gap_ms']:>15.1f}")


if __name__ == "__main__":
    main()
