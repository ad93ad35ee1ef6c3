"""k sweep under load: ngram,target at k=1..6 (and off), closed loop, interleaved repeats."""
import asyncio, json, sys, time, statistics as st
import httpx
sys.path.insert(0, ".")  # run from the repository root, with the stack up
from shared.cli.adaptive_bench import workload

CHAIN = sys.argv[1] if len(sys.argv) > 1 else "ngram,target"
CONC = int(sys.argv[2]) if len(sys.argv) > 2 else 16
N = int(sys.argv[3]) if len(sys.argv) > 3 else 48
REPEATS = int(sys.argv[4]) if len(sys.argv) > 4 else 3
import os
KS = [int(x) for x in os.environ.get("KS", "1,2,3,4,5,6").split(",")]

async def one(client, prompt, k):
    body = {"model": "specmesh", "prompt": prompt, "max_tokens": 48, "temperature": 0, "stream": False}
    body["speculation"] = {"enabled": False} if k == 0 else {"chain": CHAIN, "k": k}
    t0 = time.perf_counter()
    r = await client.post("/v1/completions", json=body)
    r.raise_for_status()
    d = r.json()
    return d["usage"]["completion_tokens"], time.perf_counter() - t0

async def run(client, prompts, k):
    q = list(prompts); out = []
    t0 = time.perf_counter()
    async def w():
        while q:
            p, dom = q.pop(0)
            out.append((dom,) + await one(client, p, k))
    await asyncio.gather(*(w() for _ in range(CONC)))
    secs = time.perf_counter() - t0
    return sum(t for _, t, _ in out) / secs

async def main():
    prompts = workload(N)
    res = {k: [] for k in [0] + KS}
    async with httpx.AsyncClient(base_url="http://127.0.0.1:18000", timeout=300) as c:
        await run(c, prompts[:16], 4)  # warm
        for rep in range(REPEATS):
            order = ([0] + KS)[rep % (len(KS) + 1):] + ([0] + KS)[:rep % (len(KS) + 1)]
            if rep % 2: order = order[::-1]
            for k in order:
                res[k].append(await run(c, prompts, k))
                print(rep, k, round(res[k][-1], 1), flush=True)
    for k, v in res.items():
        print(f"k={k}: median {st.median(v):.1f} tok/s  runs {[round(x,1) for x in v]}")

asyncio.run(main())
