"""Cost of logprobs: closed loop, same prompts, chain ngram,target k=4, none vs logprobs=5 vs 20, ABAB repeats."""
import asyncio, sys, time, statistics as st
import httpx
sys.path.insert(0, ".")  # run from the repository root, with the stack up
from shared.cli.adaptive_bench import workload

CONC = int(sys.argv[1]) if len(sys.argv) > 1 else 1
N = int(sys.argv[2]) if len(sys.argv) > 2 else 16
MODES = {"none": {}, "logprobs=5": {"logprobs": 5}, "logprobs=20": {"logprobs": 20}}

async def run(c, prompts, extra):
    q = list(prompts); toks = 0; t0 = time.perf_counter()
    async def w():
        nonlocal toks
        while q:
            p, _ = q.pop(0)
            r = await c.post("/v1/completions", json={"model": "specmesh", "prompt": p, "max_tokens": 48, "temperature": 0,
                                                      "speculation": {"chain": "ngram,target", "k": 4}} | extra)
            r.raise_for_status(); toks += r.json()["usage"]["completion_tokens"]
    await asyncio.gather(*(w() for _ in range(CONC)))
    return toks / (time.perf_counter() - t0)

async def main():
    prompts = workload(N); res = {m: [] for m in MODES}
    async with httpx.AsyncClient(base_url="http://127.0.0.1:18000", timeout=300) as c:
        await run(c, prompts[:4], {})
        for rep in range(4):
            for m in (list(MODES) if rep % 2 == 0 else list(MODES)[::-1]):
                res[m].append(await run(c, prompts, MODES[m]))
    for m, v in res.items():
        print(f"{m}: median {st.median(v):.1f} tok/s runs {[round(x,1) for x in v]}")

asyncio.run(main())
