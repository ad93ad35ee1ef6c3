"""`specmesh bench soak`: N concurrent streams for M minutes against the running stack.

    make up && specmesh bench soak --streams 8 --minutes 5 --json

Each stream sends greedy streaming completions back to back (chains rotate through the
served ones). Reported: requests, errors (with the first few messages), tokens/s, TTFT and
end-to-end p50/p99, and every local process's resident memory at the start, after a
warm-up, and at the end — growth after warm-up is what a leak looks like.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import typer

from shared.bench.sse import StreamError
from shared.bench.sse import chunks as sse_chunks
from shared.cli.client import api_key_header, served_model

CHAINS = ["target", "drafter,target", "drafter,verifier,target", "ngram,drafter,target"]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def memory(run_dir: Path) -> dict[str, float]:
    """Resident MiB of every process the stack's pid files record."""
    from shared.stack.procs import PidFile

    out = {}
    for path in sorted((run_dir / "pids").glob("*.json")):
        record = PidFile(run_dir, path.stem).live()
        if record is not None and (mib := rss_mib(record.pid)) is not None:
            out[path.stem] = round(mib, 1)
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def soak(url: str, prompts: list[str], streams: int, seconds: float, max_tokens: int, on_done) -> dict:
    import httpx

    records: list[dict] = []
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    async def stream(worker: int, client: httpx.AsyncClient) -> None:
        i = worker
        while time.monotonic() < deadline:
            body = {"model": served_model(), "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "speculation": {"chain": CHAINS[i % len(CHAINS)]}}
            i += streams
            t0 = time.perf_counter()
            first = None
            chunks = 0
            try:
                async with client.stream("POST", "/v1/completions", json=body) as resp:
                    if resp.status_code != 200:
                        errors.append(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                        continue
                    async for _ in sse_chunks(resp):
                        first = first or time.perf_counter()
                        chunks += 1
            except StreamError as exc:
                errors.append(str(exc))
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            end = time.perf_counter()
            records.append({"ttft_ms": 1e3 * ((first or end) - t0), "e2e_ms": 1e3 * (end - t0), "chunks": chunks})
            on_done()

    async with httpx.AsyncClient(base_url=url, timeout=120, headers=api_key_header()) as client:
        await asyncio.gather(*(stream(w, client) for w in range(streams)))
    return {"records": records, "errors": errors}


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("soak")
    def bench_soak(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        streams: int = typer.Option(8, min=1, max=256, help="Concurrent streams."),
        minutes: float = typer.Option(2.0, min=0.05, max=240, help="How long to run."),
        max_tokens: int = typer.Option(32, min=1),
        warmup_s: float = typer.Option(20.0, min=0, help="Memory is compared from this point on."),
    ) -> None:
        """N concurrent streams for M minutes: errors, memory growth per process, p99 latencies."""
        from tqdm import tqdm

        from shared.models.corpus import heldout_prompts
        from shared.settings import get_settings

        settings = get_settings()
        prompts = heldout_prompts("code", 16, 160) + heldout_prompts("prose", 16, 160)
        seconds = minutes * 60
        start_mem = memory(settings.run_dir)
        if not start_mem:
            typer.secho(f"error: no running stack under {settings.run_dir}; run `make up`", err=True, fg="red")
            raise typer.Exit(1)
        marks: dict[str, dict] = {}

        async def run() -> dict:
            bar = tqdm(total=None, desc="soak requests", unit="req", mininterval=2)

            async def sample_memory():
                await asyncio.sleep(min(warmup_s, seconds / 2))
                marks["warm"] = memory(settings.run_dir)

            sampler = asyncio.create_task(sample_memory())
            try:
                return await soak(settings.gateway.http_url, prompts, streams, seconds, max_tokens, bar.update)
            finally:
                await sampler
                bar.close()

        t0 = time.perf_counter()
        result = asyncio.run(run())
        wall = time.perf_counter() - t0
        end_mem = memory(settings.run_dir)
        warm = marks.get("warm", start_mem)
        records = result["records"]
        report = {
            "streams": streams, "seconds": round(wall, 1), "max_tokens": max_tokens,
            "requests": len(records), "errors": len(result["errors"]), "first_errors": result["errors"][:5],
            "requests_per_s": round(len(records) / wall, 3),
            "ttft_ms": {q: _round(percentile([r["ttft_ms"] for r in records], q)) for q in (50, 99)},
            "e2e_ms": {q: _round(percentile([r["e2e_ms"] for r in records], q)) for q in (50, 99)},
            "memory_mib": {name: {"start": start_mem.get(name), "warm": warm.get(name), "end": mib,
                                  "growth_after_warmup": None if warm.get(name) is None else round(mib - warm[name], 1)}
                           for name, mib in end_mem.items()},
        }
        if as_json:
            typer.echo(json.dumps(report, indent=2))
            return
        typer.echo(f"{report['requests']} requests in {report['seconds']} s with {streams} streams: "
                   f"{report['errors']} errors, TTFT p50/p99 {report['ttft_ms'][50]}/{report['ttft_ms'][99]} ms, "
                   f"end-to-end p50/p99 {report['e2e_ms'][50]}/{report['e2e_ms'][99]} ms")
        for name, m in report["memory_mib"].items():
            growth = "n/a" if m["growth_after_warmup"] is None else f"{m['growth_after_warmup']:+}"
            typer.echo(f"  {name:<12} RSS {m['start']} -> {m['warm']} -> {m['end']} MiB (after warm-up {growth} MiB)")
        for error in report["first_errors"]:
            typer.secho(f"  error: {error}", fg="red")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
