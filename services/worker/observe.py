"""The driver's observability: spans of traced requests and Prometheus metrics.

Nothing here changes what the driver does; every function takes the `Driver` it observes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.engine.build import canonical
from shared.tracing import SpanKind, end

if TYPE_CHECKING:
    from services.worker.driver import Job
    from shared.engine.chain import Chain
    from shared.messages import GenerateJob


def observe_target(driver) -> None:
    """Spans around the local target's prefill and score, and its rollbacks counted.

    The chains call the target runner directly; its methods are wrapped on this instance
    only (nothing changes in what they do).
    """
    if not driver.spans.enabled and driver.metrics is None:
        return
    target = driver.target
    if driver.metrics is not None:
        driver.metrics.waiting.set_function(lambda: len(driver.waiting))
        driver.metrics.live.set_function(lambda: len(driver.jobs))
        driver.metrics.kv.watch("target", target)
    prefill, score, rollback = target.prefill, target.score, target.rollback

    def traced_prefill(request_id, tokens, *args, **kwargs):
        span = driver.spans.open(request_id, "prefill target", {"specmesh.level": "target", "specmesh.tokens": len(tokens)})
        try:
            return prefill(request_id, tokens, *args, **kwargs)
        finally:
            end(span)

    def traced_score(request_ids, chunks):
        spans = [driver.spans.open(rid, "score target", {"specmesh.level": "target", "specmesh.tokens": len(c),
                                                       "specmesh.position": target.length(rid),
                                                       "specmesh.batch_size": len(request_ids)})
                 for rid, c in zip(request_ids, chunks)] if driver.spans.roots else []
        try:
            return score(request_ids, chunks)
        finally:
            for span in spans:
                end(span)

    def counted_rollback(request_id, length):
        before = target.length(request_id)
        rollback(request_id, length)
        if length < before:
            driver._rolled_back("target", request_id)

    target.prefill, target.score, target.rollback = traced_prefill, traced_score, counted_rollback


def trace_admission(driver, msg: GenerateJob) -> None:
    """Start tracing a traced request: a `queue` span from its arrival to its admission."""
    arrival = driver.arrivals.pop(msg.request_id, None)
    if arrival is None or not driver.spans.start(msg.request_id, arrival[0]):
        return
    span = driver.spans.open(msg.request_id, "queue", {"specmesh.request_id": msg.request_id,
                                                     "specmesh.waiting": len(driver.waiting)},
                           kind=SpanKind.CONSUMER, start_time=arrival[1])
    end(span, worker=driver.worker, live=len(driver.jobs))


def open_steps(driver, key: tuple[str, ...], chain: Chain) -> dict:
    """Before a chain step: the batch counted, and a `step` span per traced request."""
    live = [rid for rid, r in chain.requests.items() if not r.done]
    if driver.metrics is not None:
        driver.metrics.batch_size.observe(len(live))
        driver.metrics.steps.inc()
    steps = {}
    for rid in live:
        job = driver.jobs.get(rid)
        if job is None:
            continue
        job.steps += 1
        if not driver.spans.traced(rid):
            continue
        span = driver.spans.open(rid, "step", {"specmesh.chain": ",".join(key), "specmesh.step": job.steps,
                                             "specmesh.batch_size": len(live),
                                             "specmesh.epoch": driver.epochs.get(rid, 0)})
        steps[rid] = (span, driver.spans.enter(rid, span))
    return steps


def close_steps(driver, steps: dict, error: str | None = None) -> None:
    for rid, (span, previous) in steps.items():
        driver.spans.leave(rid, previous)
        end(span, error, epoch_end=driver.epochs.get(rid))


def count(driver, job: Job, merged: dict, emitted: int) -> None:
    """Add the request's new speculation stats to the counters and to its open span."""
    drafted, accepted, levels = [], [], []
    for name, st in merged.items():
        level = canonical(name)
        before = job.counted.get(name, (0, 0, 0, []))
        drafts = st.drafted_per_pos[0] if st.drafted_per_pos else 0
        per_pos = [n - (before[3][j] if j < len(before[3]) else 0) for j, n in enumerate(st.accepted_per_pos)]
        if driver.metrics is not None:
            driver.metrics.add(level, drafts - before[0], st.drafted - before[1], st.accepted - before[2], per_pos)
        drafted.append(st.drafted - before[1])
        accepted.append(st.accepted - before[2])
        driver.stats_log.proposed(level, drafted[-1], accepted[-1])
        levels.append(level)
        job.counted[name] = (drafts, st.drafted, st.accepted, list(st.accepted_per_pos))
    span = driver.spans.span(job.msg.request_id)
    if span.is_recording():
        span.set_attributes({"specmesh.emitted": emitted, "specmesh.levels": levels,
                             "specmesh.drafted": drafted, "specmesh.accepted": accepted})


def depth_metrics(metrics):
    """The depth policy's listener: each steered round's depth, and the rounds it cut."""
    def observe(key: tuple[str, ...], depth: int, deepest: int) -> None:
        chain = ",".join(key)
        metrics.depth.labels(chain).observe(depth)
        if depth < deepest:
            metrics.depth_cut.labels(chain).inc()
    return observe
