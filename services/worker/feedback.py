"""What the target's driver tells the router: each finished request's outcome, step profiles.

Best effort, off the token path: a lost message costs the router one sample.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from shared.engine.build import canonical
from shared.engine.stats import LevelStats
from shared.messages import (
    DRIVER, HOP, SUBJECT_OUTCOME, SUBJECT_PROFILE, LevelOutcome, ModelStep, Outcome, StepProfile, encode,
)
from shared.tracing import inject

if TYPE_CHECKING:
    from services.worker.driver import Job

log = logging.getLogger("specmesh.driver")


def outcome(driver, job: Job, req, stats: dict, reason: str | None) -> None:
    """Tell the router how the finished request went, once its last commit is answered.

    Call before the request's last commit. Timings are taken from the state service's
    answers to the commits (tokens durable and on their way to the client), not from the
    driver's own emission, so that the per-token delivery a chain causes (one commit per
    round: many for the target alone, few for a chain that emits several tokens a round)
    counts as the client sees it; the driver's own clock is the fallback.
    """
    emitted = time.perf_counter()
    tokens = len(job.done) + job.sent
    first_token = job.first_token or emitted
    key = job.chain_key
    above = {name: key[i + 1] for i, name in enumerate(key[:-1])}
    levels = [LevelOutcome(canonical(lv["name"]), canonical(above.get(lv["name"], "target")), lv["drafted"], lv["accepted"],
                           list(st.drafted_per_pos), lv["accepted_per_pos"], round(st.overlap, 4), st.overlap_positions)
              for lv, st in zip(stats["levels"], merged(job, req).values())]
    batch_mean = round(job.batch_sum / job.steps, 3) if job.steps else 0.0
    mixed_share = round(job.mixed / job.steps, 3) if job.steps else 0.0
    trace = driver.spans.roots.get(job.msg.request_id)

    def finished(acked) -> None:
        first, last, n = acked if acked and acked[2] > 0 else (first_token, emitted, tokens)
        ttft, duration = (first - job.started) * 1e3, (last - job.started) * 1e3
        tpot = (last - first) * 1e3 / max(n - 1, 1)
        result = Outcome(job.msg.request_id, job.msg.request_class, list(key), list(req.k), tokens,
                         len(job.msg.prompt), round(ttft, 3), round(tpot, 3), round(duration, 3), levels,
                         reason or "", driver.worker, batch_mean, job.msg.slo_tpot_ms, mixed_share, list(req.depths))
        send(driver, SUBJECT_OUTCOME, result, trace)

    driver.committer.when_finished(job.msg.request_id, finished)


def send(driver, subject: str, message, trace=None) -> None:
    data = encode(message)
    headers = inject(trace) if trace is not None else None

    async def publish() -> None:
        try:
            await driver.nc.publish(subject, data, headers=headers)
        except Exception as exc:  # feedback is best effort: the router also learns from the next one
            log.debug("feedback to %s not sent: %s", subject, exc)

    driver.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(publish()))


def profile(driver) -> None:
    """Every second: each model's forwards, seconds and tokens since the last report."""
    now = time.perf_counter()
    interval = now - driver._last_profile
    if interval < 1.0:
        return
    driver._last_profile = now
    runners = {"target": driver.target} | {name: r for name, r in driver.remotes.items()}
    batch = driver._batch_sum / driver._batch_steps if driver._batch_steps else 0.0
    driver._batch_sum = driver._batch_steps = 0
    steps = []
    for name, runner in runners.items():
        totals = (runner.forwards, runner.forward_s, runner.forward_tokens)
        before = driver._profiled.get(name, (0, 0.0, 0))
        driver._profiled[name] = totals
        forwards = totals[0] - before[0]
        if forwards > 0:
            steps.append(ModelStep(name, str(getattr(runner, "device", "cpu")), forwards,
                                   round(totals[1] - before[1], 6), totals[2] - before[2], round(batch, 3)))
    # Two pseudo-models the router's cost model needs: the driver's own work per round
    # (tokens = requests in the round) and the NATS round trip of level calls (tokens = calls
    # x the mean batch, so that the router can fit the round trip against the load).
    rounds, driver._overhead = driver._overhead, []
    if rounds:
        steps.append(ModelStep(DRIVER, "cpu", len(rounds), round(sum(rounds), 6), round(batch * len(rounds)), round(batch, 3)))
    calls = sum(r.calls for r in driver.remotes.values())
    hop_s = sum(r.hop_s for r in driver.remotes.values())
    before = driver._profiled.get(HOP, (0, 0.0, 0))
    driver._profiled[HOP] = (calls, hop_s, calls)
    if calls > before[0]:
        steps.append(ModelStep(HOP, "nats", calls - before[0], round(hop_s - before[1], 6),
                               round((calls - before[0]) * max(batch, 1.0)), round(batch, 3)))
    if steps:
        send(driver, SUBJECT_PROFILE, StepProfile(driver.worker, round(interval, 3), len(driver.jobs), len(driver.waiting), steps))


def merged(job: Job, req) -> dict:
    """The request's per-level stats so far, across every chain it ran on."""
    out = {name: LevelStats(name) for name in job.levels}
    for part in (job.levels, req.stats):
        for name, st in part.items():
            acc = out.setdefault(name, LevelStats(name))
            acc.drafted += st.drafted
            acc.accepted += st.accepted
            acc.overlap += st.overlap
            acc.overlap_positions += st.overlap_positions
            for attr in ("accepted_per_pos", "drafted_per_pos"):
                mine, theirs = getattr(acc, attr), getattr(st, attr)
                mine.extend([0] * (len(theirs) - len(mine)))
                for j, x in enumerate(theirs):
                    mine[j] += x
    return out
