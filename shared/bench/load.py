"""The open-loop load driver: requests at scheduled times over the gateway's streaming
HTTP API, each measured at the client (TTFT, TPOT, ITL, tokens, chain, acceptance).

    records = asyncio.run(run_load(LoadConfig(url="http://127.0.0.1:18000", rates=[1, 2])))

Open loop: a request is sent at its arrival time whether or not earlier ones finished, so
an overloaded server shows as growing latency, not as a slower client. Bounded: each cell
(arrival process x rate x mode) sends at most `max_requests` within `duration_s` (longer at
a rate too low for `min_requests` in it), then
waits at most `drain_s` for the requests still running and cancels the rest (recorded as
failures). Loopback only: a non-loopback URL is refused.

With `repeats` > 1 each (process, rate) block runs as that many rounds of every mode, each
mode `duration_s` per round, in orders where each mode follows every other one equally
often (`balanced_orders`), so a machine whose speed drifts during the run (other work on
shared cores), or a slow mode's aftermath, weighs on every mode alike; a cell's statistics
pool its rounds (wall time summed).

The chain a request ran on comes from the final SSE chunk (the one with `finish_reason`),
which carries the request's `speculation: {chain, k, levels}`; `stream_options.include_usage`
adds the prompt token count. Streaming is kept so TTFT and ITL are real.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

from shared.bench.arrivals import Arrivals, phased_times
from shared.bench.sse import StreamError, chunks
from shared.bench.stats import RequestRecord, Slo
from shared.cli.client import served_model

ADAPTIVE = "adaptive"
OFF = "off"


@dataclass(frozen=True)
class Mode:
    """How requests ask for speculation: `speculation` is the request's field, None = omitted."""

    name: str
    speculation: dict | None

    @classmethod
    def parse(cls, name: str, k: int) -> "Mode":
        """`off` (no speculation), `adaptive` (router's choice), or a chain like `drafter,target`."""
        name = name.strip()
        if name == OFF:
            return cls(OFF, {"enabled": False})
        if name == ADAPTIVE:
            return cls(ADAPTIVE, None)
        levels = [x.strip() for x in name.split(",") if x.strip()]
        if len(levels) < 2 or levels[-1] != "target":
            raise ValueError(f"mode {name!r}: give off, adaptive or a chain ending in target, e.g. drafter,target")
        return cls(",".join(levels), {"chain": ",".join(levels), "k": k})


@dataclass
class LoadConfig:
    """One `bench load` run. Times in seconds, SLOs in milliseconds."""

    url: str
    rates: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    modes: list[str] = field(default_factory=lambda: [OFF, "drafter,target", "drafter,verifier,target", ADAPTIVE])
    processes: list[str] = field(default_factory=lambda: ["poisson", "gamma"])
    burstiness: float = 0.5            # gamma shape: CV = 1/sqrt(0.5) = 1.41
    duration_s: float = 15.0           # arrival window per cell
    max_requests: int = 500            # per cell
    drain_s: float = 20.0              # longest wait for a cell's last requests
    max_tokens: int = 32
    prompt_chars: int = 200
    prompts_per_domain: int = 16
    k: int = 4
    slo_ttft_ms: float = 300.0
    slo_tpot_ms: float = 25.0
    seed: int = 0
    phased_rates: list[float] = field(default_factory=lambda: [1.0, 8.0, 1.0])
    phase_s: float = 15.0              # per phase; 0 = no phased run
    phased_mode: str = ADAPTIVE
    repeats: int = 1                   # rounds per (process, rate), modes interleaved
    min_requests: int = 0              # per cell and round: a low rate's window grows to about this many

    @property
    def slo(self) -> Slo:
        return Slo(self.slo_ttft_ms / 1e3, self.slo_tpot_ms / 1e3)

    def cells(self) -> list[tuple[str, float, str]]:
        """(process, rate, mode), one per reported cell: modes innermost, so they see the same conditions."""
        return [(p, r, m) for p in self.processes for r in self.rates for m in self.modes]

    def rounds(self) -> list[tuple[str, float, int, str]]:
        """(process, rate, round, mode) in run order: per (process, rate), `repeats` rounds of
        every mode, in the orders of `balanced_orders`: a mode does not always run right after
        the same one (a slow chain's aftermath, a warm cache, fall on different modes)."""
        orders = balanced_orders(len(self.modes))
        return [(p, r, i, self.modes[j]) for p in self.processes for r in self.rates
                for i in range(self.repeats) for j in orders[i % len(orders)]]

    def window(self, rate: float) -> float:
        """Seconds of arrivals per cell and round at `rate`: `duration_s`, longer at a rate too low
        for `min_requests` in it (at 1 req/s a 6 s cell holds ~6 requests: percentiles of noise)."""
        return max(self.duration_s, self.min_requests / rate)

    def arrivals(self, process: str, rate: float) -> Arrivals:
        return Arrivals(process, rate, self.burstiness if process == "gamma" else 1.0)

    def schedule(self, process: str, rate: float, round_: int = 0) -> list[tuple[float, int]]:
        """The same arrival times for every mode of a (process, rate) cell in one round."""
        seed = _seed(round_seed(self.seed, round_), process, rate)
        times = self.arrivals(process, rate).times(self.window(rate), seed, self.max_requests)
        return [(t, 0) for t in times]

    def phased_schedule(self) -> list[tuple[float, int]]:
        phases = [(Arrivals("poisson", r), self.phase_s) for r in self.phased_rates]
        return phased_times(phases, seed=self.seed + 1000, max_requests=self.max_requests * len(phases))


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of n modes (a Williams design) in which each mode directly follows every other
    one equally often: once over the n orders for an even n, twice over the 2n for an odd n
    (each order then followed by its mirror, so two rounds already change who follows whom).
    The first order starts with mode 0 and a rotation of it does not change predecessors."""
    if n <= 1:
        return [list(range(n))]
    first = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]
    square = [[(a + i) % n for a in first] for i in range(n)]
    if n % 2 == 0:
        return square
    return [order for row in square for order in (row, row[::-1])]


def round_seed(seed: int, round_: int) -> int:
    """The run's seed for one round of `--repeats` (round 0: the seed itself)."""
    return seed + round_ * 7919


def _seed(seed: int, process: str, rate: float) -> int:
    """A stable seed per cell (Python's str hash is salted per process, so not `hash`)."""
    return seed * 1_000_003 + sum(map(ord, process)) * 10_007 + int(rate * 1000)


def check_loopback(url: str) -> None:
    """Refuse to load anything but this machine."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"the load driver only targets loopback; {url!r} is not (use 127.0.0.1 or localhost)")


def prompt_mix(prompt_chars: int, per_domain: int, seed: int = 0) -> list[tuple[str, str]]:
    """`(domain, text)` held-out prompts, both domains interleaved."""
    from shared.models.corpus import heldout_prompts

    code = heldout_prompts("code", per_domain, prompt_chars, seed)
    prose = heldout_prompts("prose", per_domain, prompt_chars, seed)
    return [pair for c, p in zip(code, prose) for pair in (("code", c), ("prose", p))]


def fresh_salt() -> str:
    """A cache_salt of one request's own: the configurations a benchmark compares run the
    same prompts, and a prompt one ran would otherwise start on the head the model services
    cached for it (prefix caching), making whatever runs later look faster."""
    return uuid.uuid4().hex


def request_body(mode: Mode, prompt: str, max_tokens: int, slo_tpot_ms: float = 0.0) -> dict:
    """One streamed completion; the TPOT objective rides along (the router's table serves it)."""
    body = {"model": served_model(), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}, "cache_salt": fresh_salt()}
    speculation = dict(mode.speculation or {}) | ({"slo_tpot_ms": slo_tpot_ms} if slo_tpot_ms else {})
    if speculation:
        body["speculation"] = speculation
    return body


async def send(client, body: dict, record: RequestRecord) -> None:
    """Stream one request and fill `record`'s measurements (errors become `record.error`)."""
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                record.error = f"HTTP {resp.status_code}: {_message(text)}"
                return
            async for chunk in chunks(resp):
                now = time.perf_counter() - t0
                for choice in chunk.get("choices") or []:
                    ids = choice.get("token_ids") or []
                    if ids:
                        if last is None:
                            record.ttft_s = now
                        else:
                            record.itl_s.append(now - last)
                        last = now
                        record.output_tokens += len(ids)
                spec = chunk.get("speculation")
                if spec:
                    record.chain = list(spec.get("chain") or [])
                    record.k = list(spec.get("k") or [])
                    record.levels = [{"name": lv.get("name"), "drafted": lv.get("drafted", 0),
                                      "accepted": lv.get("accepted", 0)} for lv in spec.get("levels") or []]
                usage = chunk.get("usage")
                if usage:
                    record.prompt_tokens = int(usage.get("prompt_tokens", 0))
        record.e2e_s = last
        if last is None:
            record.error = "no token received"
    except StreamError as exc:
        record.error = f"stream error: {exc}"
    except asyncio.CancelledError:
        record.error = record.error or "cancelled: not finished within the drain time"
        raise
    except Exception as exc:  # noqa: BLE001 - every transport failure is one failed request
        record.error = f"{type(exc).__name__}: {exc}"


def _message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


async def run_schedule(client, schedule: list[tuple[float, int]], mode: Mode, prompts: list[tuple[str, str]],
                       cfg: LoadConfig, process: str, rate: float | list[float],
                       on_done: Callable[[RequestRecord], None] = lambda r: None,
                       round_: int = 0) -> tuple[list[RequestRecord], float]:
    """Send `schedule`'s requests at their times; the records and the wall time of the cell.

    Prompts are drawn by a generator seeded with `cfg.seed` and the round, so every mode of
    a cell sends the same prompts at the same times.
    """
    rng = random.Random(round_seed(cfg.seed, round_))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task] = []

    async def one(record: RequestRecord, body: dict) -> None:
        try:
            await send(client, body, record)
        finally:
            on_done(record)

    for scheduled, phase in schedule:
        delay = t0 + scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        domain, text = rng.choice(prompts)
        r = rate[phase] if isinstance(rate, list) else rate
        record = RequestRecord(mode=mode.name, process=process, rate=r, scheduled_s=scheduled, domain=domain,
                               sent_s=loop.time() - t0, phase=phase, round=round_)
        records.append(record)
        tasks.append(asyncio.create_task(one(record, request_body(mode, text, cfg.max_tokens, cfg.slo_tpot_ms))))
    if tasks:
        window = schedule[-1][0] if schedule else 0.0
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, t0 + window + cfg.drain_s - loop.time()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return records, loop.time() - t0


async def warm_up(client, modes: list[Mode], prompt: str) -> None:
    """One short request per mode, so no cell pays for first-use costs."""
    for mode in modes:
        await send(client, request_body(mode, prompt, 4), RequestRecord(mode.name, "warmup", 0.0, 0.0))


async def run_load(cfg: LoadConfig, progress=None) -> dict:
    """Every cell, then the phased run. Returns `{"cells": [...], "phased": {...} | None}` with
    records as `RequestRecord`s; `progress` (a tqdm bar or None) is advanced per request."""
    import httpx

    from shared.heap import freeze

    check_loopback(cfg.url)
    modes = [Mode.parse(m, cfg.k) for m in cfg.modes]
    prompts = prompt_mix(cfg.prompt_chars, cfg.prompts_per_domain, cfg.seed)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    timeout = httpx.Timeout(cfg.drain_s + max(cfg.window(r) for r in cfg.rates) + 60.0, connect=10.0)

    def done(record: RequestRecord) -> None:
        if progress is not None:
            progress.update(1)

    phased = Mode.parse(cfg.phased_mode, cfg.k)
    by_name = {m.name: m for m in modes + [phased]}
    out: dict = {"cells": [], "phased": None}
    from shared.cli.client import api_key_header  # SPECMESH_API_KEY, when the gateway wants one

    async with httpx.AsyncClient(base_url=cfg.url, limits=limits, timeout=timeout, trust_env=False,
                                 headers=api_key_header()) as client:
        await warm_up(client, list(by_name.values()), prompts[0][1])
        freeze()  # no collection of the client's start-up heap pauses a request's clock (shared.heap)
        cells: dict[tuple[str, float, str], dict] = {}
        for process, rate, name in cfg.cells():
            mode = by_name[Mode.parse(name, cfg.k).name]
            cells[(process, rate, mode.name)] = {"process": process, "rate": rate, "mode": mode.name, "wall_s": 0.0,
                                                 "rounds": 0, "records": []}
        for process, rate, round_, name in cfg.rounds():
            mode = by_name[Mode.parse(name, cfg.k).name]
            if progress is not None:
                label = f" round {round_ + 1}/{cfg.repeats}" if cfg.repeats > 1 else ""
                progress.set_postfix_str(f"{process} {rate:g}/s {mode.name}{label}", refresh=False)
            records, wall = await run_schedule(client, cfg.schedule(process, rate, round_), mode, prompts, cfg,
                                               process, rate, done, round_)
            cell = cells[(process, rate, mode.name)]
            cell["records"].extend(records)
            cell["wall_s"] += wall
            cell["rounds"] += 1
        out["cells"] = list(cells.values())
        if cfg.phase_s > 0 and cfg.phased_rates:
            mode = phased
            if progress is not None:
                progress.set_postfix_str(f"phased {'->'.join(f'{r:g}' for r in cfg.phased_rates)}/s {mode.name}",
                                         refresh=False)
            records, wall = await run_schedule(client, cfg.phased_schedule(), mode, prompts, cfg, "phased",
                                               list(cfg.phased_rates), done)
            out["phased"] = {"mode": mode.name, "rates": list(cfg.phased_rates), "phase_s": cfg.phase_s,
                             "wall_s": wall, "records": records}
    return out


def planned_requests(cfg: LoadConfig) -> int:
    """How many requests the run will send (the progress bar's total)."""
    n = sum(len(cfg.schedule(p, r, i)) for p, r, i, _ in cfg.rounds())
    if cfg.phase_s > 0 and cfg.phased_rates:
        n += len(cfg.phased_schedule())
    return n
