"""The target driver's waiting queue: beyond max_batch, jobs wait by priority, then arrival.
Pure: no models, no NATS (`_start` records what it admits)."""

from __future__ import annotations

from types import SimpleNamespace

from services.worker.driver import Driver
from shared.messages import GenerateJob
from shared.settings import Settings


def driver(max_batch: int) -> tuple[Driver, list[str]]:
    settings = Settings()
    settings.engine.max_batch = max_batch
    d = Driver("test", SimpleNamespace(vocab_size=8, eos_token_id=None), nc=None, loop=None, settings=settings)
    started: list[str] = []

    def start(msg: GenerateJob) -> None:
        started.append(msg.request_id)
        d.jobs[msg.request_id] = msg

    d._start = start
    return d, started


def test_waiting_jobs_are_admitted_by_priority_then_arrival():
    d, started = driver(max_batch=1)
    d.intake.put(("job", GenerateJob("running", [1], 4, priority=5)))
    d._drain(block=False)
    for rid, priority in [("b", 0), ("c", 0), ("urgent", -3), ("late", 9), ("d", 0), ("soon", -3)]:
        d.intake.put(("job", GenerateJob(rid, [1], 4, priority=priority)))
    d._drain(block=False)
    assert started == ["running"]  # it took the free slot; it is not preempted
    assert [j.request_id for j in d.waiting] == ["urgent", "soon", "b", "c", "d", "late"]
    d.intake.put(("cancel", "soon"))
    d._drain(block=False)
    order = []
    while d.waiting:
        d.jobs.clear()  # a slot frees
        d._drain(block=False)
        order.append(started[-1])
    assert order == ["urgent", "b", "c", "d", "late"]


def test_a_resent_job_already_waiting_keeps_its_place():
    d, started = driver(max_batch=1)
    for rid in ("a", "b", "c"):
        d.intake.put(("job", GenerateJob(rid, [1], 4)))
    d.intake.put(("job", GenerateJob("b", [1], 4, priority=-1)))  # a resend changes nothing
    d._drain(block=False)
    assert started == ["a"] and [j.request_id for j in d.waiting] == ["b", "c"]
