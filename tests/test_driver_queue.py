"""The target driver's waiting queue: beyond max_batch, jobs wait by priority, then arrival,
and a more urgent job preempts the least urgent running one. The queue's logic is tested
pure (`_start` records what it admits); preemption's tokens on the tiny family's target,
with the commits recorded instead of sent."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from services.worker.driver import Driver, Job
from shared.messages import GenerateJob, Sampling
from shared.settings import Settings


def driver(max_batch: int) -> tuple[Driver, list[str]]:
    settings = Settings()
    settings.engine.max_batch = max_batch
    d = Driver("test", SimpleNamespace(vocab_size=8, eos_token_id=None), nc=None, loop=None, settings=settings)
    started: list[str] = []

    def start(msg: GenerateJob) -> None:
        started.append(msg.request_id)
        d.jobs[msg.request_id] = d.preempted.pop(msg.request_id, None) or Job(msg, ("target",))

    d._start = start
    d.committer = SimpleNamespace(forget=lambda rid: None)
    d._preempt = lambda job: (d.jobs.pop(job.msg.request_id), d.preempted.__setitem__(job.msg.request_id, job),
                              d._enqueue(job.msg, first=True))
    return d, started


def test_waiting_jobs_are_admitted_by_priority_then_arrival():
    d, started = driver(max_batch=1)
    d.intake.put(("job", GenerateJob("running", [1], 4, priority=9)))
    d._drain(block=False)
    for rid, priority in [("b", 9), ("c", 9), ("late", 12), ("d", 9)]:
        d.intake.put(("job", GenerateJob(rid, [1], 4, priority=priority)))
    d._drain(block=False)
    assert started == ["running"]  # it took the free slot; nothing waiting is more urgent
    for rid, priority in [("urgent", -3), ("soon", -3)]:
        d.intake.put(("job", GenerateJob(rid, [1], 4, priority=priority)))
    d._drain(block=False)
    assert started == ["running", "urgent"]  # "urgent" took running's place; running waits first among its equals
    assert [j.request_id for j in d.waiting] == ["soon", "running", "b", "c", "d", "late"]
    d.jobs.clear()
    d._drain(block=False)
    assert started[-1] == "soon"
    d.intake.put(("job", GenerateJob("later", [1], 4, priority=9)))
    d.intake.put(("cancel", "c"))
    d._drain(block=False)
    order = []
    while d.waiting:
        d.jobs.clear()  # a slot frees
        d._drain(block=False)
        order.append(started[-1])
    assert order == ["running", "b", "d", "later", "late"]


def test_the_least_urgent_latest_admitted_job_is_preempted_and_equals_are_not():
    d, started = driver(max_batch=3)
    for rid, priority in [("a", 5), ("b", 7), ("c", 7)]:
        d.intake.put(("job", GenerateJob(rid, [1], 4, priority=priority)))
    d._drain(block=False)
    d.intake.put(("job", GenerateJob("same", [1], 4, priority=7)))
    d._drain(block=False)
    assert set(d.jobs) == {"a", "b", "c"}  # as urgent as the least urgent: it waits
    d.intake.put(("job", GenerateJob("x", [1], 4, priority=6)))
    d._drain(block=False)
    assert set(d.jobs) == {"a", "b", "x"} and [j.request_id for j in d.waiting] == ["c", "same"]
    d.intake.put(("cancel", "c"))
    d._drain(block=False)
    assert [j.request_id for j in d.waiting] == ["same"] and "c" not in d.preempted


def test_a_resent_job_already_waiting_keeps_its_place():
    d, started = driver(max_batch=1)
    for rid in ("a", "b", "c"):
        d.intake.put(("job", GenerateJob(rid, [1], 4)))
    d.intake.put(("job", GenerateJob("b", [1], 4, priority=-1)))  # a resend changes nothing
    d._drain(block=False)
    assert started == ["a"] and [j.request_id for j in d.waiting] == ["b", "c"]


def traced():
    """A tracer provider keeping its spans in memory, and a gateway span's context to submit under."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gateway = provider.get_tracer("test").start_span("gateway")
    return provider, exporter, trace.set_span_in_context(gateway)


class Commits:
    """The committer's part the driver calls: commits recorded, not sent."""

    def __init__(self):
        self.commits: dict[str, list] = {}

    def commit(self, commit, trace=None) -> None:
        self.commits.setdefault(commit.request_id, []).append(commit)

    def forget(self, request_id: str) -> None:
        pass

    def when_finished(self, request_id: str, callback) -> None:
        pass

    def error(self, batch) -> None:
        raise AssertionError(f"the driver failed {batch.request_id}: {batch.error}")

    def output(self, rid: str) -> list[int]:
        """The request's tokens, checking each commit starts where the ones before ended."""
        out: list[int] = []
        for c in self.commits[rid]:
            assert c.position == len(out), (rid, c.position, len(out))
            out += c.tokens
        assert self.commits[rid][-1].finished and sum(c.finished for c in self.commits[rid]) == 1
        return out


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["recomputed", "prefix-cached"])
def test_a_preempted_request_resumes_from_its_commits_with_the_target_alones_tokens(tiny_family, prefix_caching):
    """max_batch 2, both taken by priority-5 requests (one greedy on ngram,target, one seeded
    on the target alone); a priority-0 request preempts the seeded one, which waits, then
    resumes from its prompt and committed tokens. Every request's commits are contiguous and
    its tokens are the target alone's."""
    from shared.engine.build import RunnerPool
    from shared.engine.chain import Chain
    from shared.engine.sampling import SamplingParams
    from shared.metrics import DriverMetrics, kv_requests
    from prometheus_client import CollectorRegistry

    torch.set_num_threads(1)
    pool = RunnerPool(tiny_family, max_batch=4, max_len=256, prefix_caching=prefix_caching)
    target, tok = pool.get("target"), pool.tokenizer()
    settings = Settings()
    settings.engine.max_batch = 2
    metrics = DriverMetrics(CollectorRegistry())
    provider, exporter, context = traced()
    d = Driver("test", target, nc=None, loop=None, settings=settings, tracer_provider=provider, metrics=metrics)
    d.committer = Commits()
    seeded = Sampling(temperature=0.9, top_p=0.95, seed=11)
    jobs = [GenerateJob("greedy", tok.encode("def parse(line):\n    "), 24, chain=["ngram", "target"], priority=5),
            GenerateJob("seeded", tok.encode("The river ran"), 24, sampling=seeded, priority=5),
            GenerateJob("urgent", tok.encode("import os\n"), 12, chain=["ngram", "target"], priority=0)]
    for job in jobs[:2]:
        d.submit(job, trace=context)
    d._drain(block=False)
    for _ in range(3):
        d._step()
    d.submit(jobs[2])
    d._drain(block=False)
    assert set(d.jobs) == {"greedy", "urgent"} and list(d.preempted) == ["seeded"]
    held = len(d.preempted["seeded"].done)
    assert 1 < held < 24 and metrics.preemptions._value.get() == 1
    while d.jobs or d.waiting:
        d._drain(block=False)
        d._step()
    for job in jobs:
        params = SamplingParams.from_wire(job.sampling)
        alone = Chain([("target", target)]).generate([job.prompt], job.max_tokens, params)[0]
        assert d.committer.output(job.request_id) == alone, job.request_id
    assert [c.position for c in d.committer.commits["seeded"]].count(held) == 1  # resumed at its committed length
    assert not d.preempted and kv_requests(target) == 0
    [paused] = [s for s in exporter.get_finished_spans() if s.name == "preempted"]  # the wait, in the request's trace
    assert paused.attributes["specmesh.committed"] == held and paused.end_time > paused.start_time


def test_a_long_prompt_is_read_a_chunk_a_round_between_the_decode_rounds(tiny_family):
    """Chunked prefill: with prefill_chunk 16, a 100-token prompt goes into the target's cache
    over 7 rounds while two requests keep decoding; then its chain prefill runs its last
    token only. Every output is the target alone's, and the prefix-cache counters and the
    request's cached_tokens count no warm-up as a hit."""
    from shared.engine.build import RunnerPool
    from shared.engine.chain import Chain
    from shared.engine.sampling import SamplingParams
    from shared.models.corpus import heldout_prompts

    torch.set_num_threads(1)
    pool = RunnerPool(tiny_family, max_batch=4, max_len=256, prefix_caching=True)
    target, tok = pool.get("target"), pool.tokenizer()
    settings = Settings()
    settings.engine.max_batch, settings.engine.prefill_chunk = 3, 16
    provider, exporter, context = traced()
    d = Driver("test", target, nc=None, loop=None, settings=settings, tracer_provider=provider)
    d.committer = Commits()
    long_prompt = tok.encode(heldout_prompts("prose", 1, 600, seed=5)[0])[:100]
    jobs = [GenerateJob("a", tok.encode("def main():\n    "), 40, chain=["ngram", "target"]),
            GenerateJob("b", tok.encode("The lake was"), 40, sampling=Sampling(temperature=0.8, seed=2)),
            GenerateJob("long", long_prompt, 12, chain=["ngram", "target"])]
    for job in jobs[:2]:
        d.submit(job)
    d._drain(block=False)
    queried, hits = target.prefix_queried, target.prefix_hits
    d.submit(jobs[2], trace=context)
    rounds, during = 0, []
    while "long" not in d.committer.commits:
        d._drain(block=False)
        d._step()
        during.append(sum(len(c.tokens) for rid in "ab" for c in d.committer.commits[rid]))
        d._warm()
        rounds += 1
    assert rounds == 7  # ceil(99 / 16) chunks, one a round; the 7th also joins the chain
    chunks = [s for s in exporter.get_finished_spans() if s.name == "prefill chunk"]
    assert [s.attributes["specmesh.to"] for s in chunks] == [16, 32, 48, 64, 80, 96, 99]
    assert during[-1] > during[0]  # the others decoded meanwhile
    while d.jobs or d.waiting:
        d._drain(block=False)
        d._step()
        d._warm()
    assert target.prefix_queried - queried == len(long_prompt)  # the long prompt, counted once...
    assert target.prefix_hits == hits  # ...and none of it was a hit
    assert d.committer.commits["long"][-1].stats["cached_prompt_tokens"] == 0
    # the same head with another tail: the warm-up starts after the head the cache holds, and only that is a hit
    tail = tok.encode(heldout_prompts("code", 1, 300, seed=6)[0])[:60]
    jobs.append(GenerateJob("again", long_prompt[:90] + tail, 8))
    queried, hits = target.prefix_queried, target.prefix_hits
    d.submit(jobs[-1])
    d._drain(block=False)
    assert "again" in d.warming
    while d.jobs or d.waiting:
        d._drain(block=False)
        d._step()
        d._warm()
    assert target.prefix_queried - queried == 150 and target.prefix_hits - hits == 90
    assert d.committer.commits["again"][-1].stats["cached_prompt_tokens"] == 90
    d.submit(GenerateJob("scored", tail + long_prompt, 4, prompt_logprobs=0))  # its prefill runs every row anyway
    d._drain(block=False)
    assert "scored" in d.jobs and "scored" not in d.warming and len(d.committer.commits["scored"][0].prompt_logprobs) == 159
    for job in jobs:
        alone = Chain([("target", target)]).generate([job.prompt], job.max_tokens, SamplingParams.from_wire(job.sampling))[0]
        assert d.committer.output(job.request_id) == alone, job.request_id
