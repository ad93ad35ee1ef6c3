"""The target's driver: runs chains whose lower levels live in other processes.

Jobs arrive from the gateway; one thread owns the target model and every `Chain` (one per
chain spec, continuously batched: new requests join between steps). Lower levels are
`RemoteRunner`s. After each step the newly emitted tokens of every request are committed
through the state service, which forwards them to the gateway. When a lower level stops
answering, its requests move to the chain without it (prefilled from prompt + output so
far) and it is left out for a while; the target is never left out.

In a round with requests on several chains, the chains propose at once when they share no
lower level (`speculation.parallel_chains`): their levels are other processes, so the
round waits for the slowest proposal, not for their sum. Chains that share a level propose
one after the other, in one thread, as a `RemoteRunner` serves one call at a time.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from shared.engine.build import FUSED_PARTS, canonical, models_of, parse_chain
from shared.engine.fused import FusedRunner
from shared.engine.chain import Chain, verify_rounds
from shared.engine.depth import DepthPolicy, profile_verify
from shared.engine.ngram import NgramProposer
from shared.engine.runner import Runner
from shared.engine.sampling import SamplingParams
from shared.messages import Commit, GenerateJob, TokenBatch, valid_request_id
from services.worker import feedback, observe
from services.worker.committer import Committer
from services.worker.remote import LevelUnavailable, RemoteRunner
from services.worker.stats_log import StatsLog
from shared.tracing import RequestSpans, end, tracer

log = logging.getLogger("specmesh.driver")

TERM = 1 << 20  # epoch = term * TERM + rollbacks within the term; a resumed request starts a new term
DOWN_FOR_S = 5.0


@dataclass
class WarmUp:
    """A long prompt's head being written into the target's prefix cache, a chunk a round,
    under a request id of its own (chunked prefill); its job joins its chain when it is all in."""

    request_id: str
    written: int = 0  # tokens of the head in the cache so far
    cached: int = 0  # of them, what the cache held before (a real prefix-cache hit)
    first: int = 0  # tokens of the first chunk's prefill (counted as queried by the runner)


@dataclass
class Job:
    msg: GenerateJob
    chain_key: tuple[str, ...]
    done: list[int] = field(default_factory=list)  # output committed before the current chain request
    sent: int = 0  # output tokens of the current chain request handed to the committer
    levels: dict = field(default_factory=dict)  # LevelStats of chain requests before the current one
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    steps: int = 0  # chain steps so far (for spans)
    batch_sum: int = 0  # over those steps: requests in each target round (the load it ran under)
    mixed: int = 0  # of those steps: rounds whose target forward verified other chains too
    counted: dict = field(default_factory=dict)  # per level: stats already added to the metrics
    paused: object = None  # while preempted: its `preempted` span (traced requests)


class Driver:
    """Owns the target runner and the chains; `submit` and `cancel` are thread-safe."""

    def __init__(self, worker: str, target: Runner, nc, loop: asyncio.AbstractEventLoop, settings,
                 tracer_provider=None, metrics=None):
        self.worker = worker
        self.target = target
        self.nc = nc
        self.loop = loop
        self.settings = settings
        self.intake: queue.Queue = queue.Queue()
        self.waiting: collections.deque[GenerateJob] = collections.deque()  # beyond max_batch: by priority, then arrival
        self.jobs: dict[str, Job] = {}
        self.preempted: dict[str, Job] = {}  # waiting again, with their committed tokens, for a more urgent job
        self.warming: dict[str, WarmUp] = {}  # admitted jobs whose long prompt is read a chunk a round
        self.chains: dict[tuple[str, ...], Chain] = {}
        self.epochs: dict[str, int] = {}
        self.remotes: dict[str, RemoteRunner] = {}
        self.down_until: dict[str, float] = {}
        self.spans = RequestSpans(tracer_provider)  # per-request parents; spans only for traced requests
        self.arrivals: dict[str, tuple] = {}  # request id -> (trace context, arrival ns), from submit
        self.metrics = metrics  # shared.metrics.DriverMetrics or None
        self.stats_log = StatsLog(settings.engine.log_stats_interval_s)  # vLLM's periodic throughput line
        self.committer = Committer(nc, worker, loop, tracer(tracer_provider))
        observe.observe_target(self)
        self._last_profile = time.perf_counter()
        self._profiled: dict[str, tuple[int, float, int]] = {}
        self._batch_sum = self._batch_steps = 0  # requests per round, over the profile interval
        self._overhead: list[float] = []  # per round since the last profile: seconds beyond forwards and calls
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="driver", daemon=True)
        self._proposers: concurrent.futures.ThreadPoolExecutor | None = None  # for chains proposing at once
        self._overlap_s = 0.0  # level calls' seconds that ran at the same time as others (counted once)
        self.depth: DepthPolicy | None = None  # per-round depth (speculation.adaptive_depth), profiled in the thread

    # -- called from the event loop ------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.intake.put(("wake", None))
        if self.thread.ident is not None:  # started
            self.thread.join(timeout=10)
        if self._proposers is not None:
            self._proposers.shutdown(wait=False, cancel_futures=True)

    def submit(self, job: GenerateJob, trace=None) -> None:
        """Queue `job`; `trace` is the trace context its message carried (shared.tracing.extract)."""
        if trace is not None:
            self.arrivals[job.request_id] = (trace, time.time_ns())
        self.intake.put(("job", job))

    def cancel(self, request_id: str) -> None:
        self.intake.put(("cancel", request_id))

    @property
    def live(self) -> int:
        return len(self.jobs)

    # -- chains --------------------------------------------------------------------------
    def _remote(self, model: str) -> RemoteRunner:
        if model not in self.remotes:
            self.remotes[model] = RemoteRunner(
                model, self.nc, self.loop, self.target.vocab_size, self.epochs, self.target.eos_token_ids,
                max_len=self.settings.engine.max_len, on_rollback=lambda rid, m=model: self._rolled_back(m, rid),
                spans=self.spans, lookahead=self.settings.speculation.lookahead,
            )
        return self.remotes[model]

    def _bump(self, request_id: str) -> None:
        self.epochs[request_id] = self.epochs.get(request_id, 0) + 1

    def _rolled_back(self, model: str, request_id: str) -> None:
        """A level's cache was rolled back: a new epoch (remote levels), a count, an event in the trace."""
        if model != "target":
            self._bump(request_id)
        if self.metrics is not None:
            self.metrics.rollbacks.labels(model).inc()
        span = self.spans.span(request_id)  # an event on the step's span: cheaper than a span of its own
        if span.is_recording():
            runner = self.target if model == "target" else self.remotes[model]
            span.add_event(f"rollback {model}", {"specmesh.level": model, "specmesh.epoch": self.epochs.get(request_id, 0),
                                                 "specmesh.length": runner.length(request_id)})

    def _available(self, names: tuple[str, ...]) -> tuple[str, ...]:
        now = time.monotonic()
        return tuple(n for n in names if n == "target" or all(self.down_until.get(m, 0) <= now for m in models_of(n)))

    def _chain(self, key: tuple[str, ...]) -> Chain:
        if key not in self.chains:
            levels = []
            for name in key:
                if name == "ngram":
                    levels.append((name, NgramProposer(self.target.vocab_size, device=self.target.device)))
                elif name == "target":
                    levels.append((name, self.target))
                elif name == "fused":
                    levels.append((name, FusedRunner(*(self._remote(m) for m in FUSED_PARTS))))
                else:
                    levels.append((name, self._remote(canonical(name))))
            spec = self.settings.speculation
            self.chains[key] = Chain(levels, k=spec.k, confidence_threshold=spec.confidence_threshold,
                                     leniency=spec.lenient, eos_token_id=self.target.eos_token_ids, depth=self.depth)
        return self.chains[key]

    def _ks(self, msg: GenerateJob, key: tuple[str, ...]) -> list[int]:
        """k per proposing level of `key`, from the job's k (given for the job's own chain)."""
        wanted = parse_chain(msg.chain)[:-1]
        default = self.settings.speculation.k
        given = list(msg.k) or [default]
        ks = given + [given[-1]] * max(0, len(wanted) - len(given))
        by_name = dict(zip(wanted, ks))
        return [by_name.get(name, default) for name in key[:-1]]

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        spec = self.settings.speculation
        if spec.adaptive_depth:  # before any request: the profile times the target's forwards alone
            t0 = time.perf_counter()
            profile = profile_verify(self.target, self.settings.engine.max_batch,
                                     max(self.settings.router.k_max, spec.k) + 1)
            self.depth = DepthPolicy(profile, margin=spec.adaptive_depth_margin)
            if self.metrics is not None:
                self.depth.listener = observe.depth_metrics(self.metrics)
            log.info("verification profiled for per-round depth in %.1f s (batch %s x width %s)",
                     time.perf_counter() - t0, profile.batches, profile.widths)
        while not self._stop.is_set():
            idle = not self.jobs and not self.waiting
            if idle:
                self._drain(block=True)
            t0, model_s = time.perf_counter(), self._model_seconds()
            if not idle:
                self._drain(block=False)
            stepped = self._step()
            self._warm()  # one chunk of a long prompt between two decode rounds
            if stepped:  # what the round cost beyond forwards and level calls: the driver's own work
                self._overhead.append(max(0.0, time.perf_counter() - t0 - (self._model_seconds() - model_s)))
                self._batch_sum += stepped
                self._batch_steps += 1
            feedback.profile(self)
            self.stats_log.tick(self)

    def _model_seconds(self) -> float:
        """Seconds spent in the target's forwards and waiting on level calls (calls made at
        once count once: `_overlap_s` is what they overlapped)."""
        return self.target.forward_s + sum(r.call_s for r in self.remotes.values()) - self._overlap_s

    def _step(self) -> int:
        """One round for every live request: each chain drafts, then one target forward verifies all.

        Returns the number of requests stepped."""
        live = [(key, chain) for key, chain in list(self.chains.items())
                if any(not r.done for r in chain.requests.values())]
        if self.depth is not None:  # the round's batch over every chain: one target forward verifies them all
            self.depth.batch = sum(sum(not r.done for r in chain.requests.values()) for _, chain in live)
        opened = [observe.open_steps(self, key, chain) for key, chain in live]
        rounds = []
        for (key, _), steps, pending in zip(live, opened, self._propose(live)):
            if isinstance(pending, LevelUnavailable):
                observe.close_steps(self, steps, str(pending))
                self._level_lost(key, pending)
            elif isinstance(pending, Exception):  # a bug must fail the requests, never hang them
                self._step_failed(key, steps, pending)
            elif pending is not None:
                rounds.append((key, steps, pending))
        if not rounds:
            return 0
        try:
            finished = verify_rounds([pending for _, _, pending in rounds])
        except Exception as exc:
            for key, steps, _ in rounds:
                self._step_failed(key, steps, exc)
            return 0
        stepped = sum(len(pending.ids) for _, _, pending in rounds)
        mixed = len(rounds) > 1
        for _, _, pending in rounds:
            for rid in pending.ids:
                if (job := self.jobs.get(rid)) is not None:
                    job.batch_sum += stepped
                    job.mixed += mixed
        for (key, steps, _), done in zip(rounds, finished):
            self._publish(key, done)
            observe.close_steps(self, steps)
        return stepped

    def _propose(self, live: list[tuple[tuple[str, ...], Chain]]) -> list:
        """Each chain's `propose()`: its pending round, None, or the exception it raised.

        Chains in different `independent` groups propose at once, each group in a thread of
        its own; the driver thread waits for all of them and alone acts on the outcomes.
        """
        def attempt(indices: list[int]) -> list[tuple[int, object]]:
            out = []
            for i in indices:
                try:
                    out.append((i, live[i][1].propose()))
                except Exception as exc:  # noqa: BLE001 - handed back to the driver thread
                    out.append((i, exc))
            return out

        groups = independent([key for key, _ in live]) if self.settings.speculation.parallel_chains else []
        if len(groups) < 2:
            return [pending for _, pending in attempt(list(range(len(live))))]
        if self._proposers is None:
            self._proposers = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="propose")
        t0, calls = time.perf_counter(), sum(r.call_s for r in self.remotes.values())
        futures = [self._proposers.submit(attempt, group) for group in groups[1:]]
        results = attempt(groups[0]) + [x for f in futures for x in f.result()]
        waited = sum(r.call_s for r in self.remotes.values()) - calls
        self._overlap_s += max(0.0, waited - (time.perf_counter() - t0))
        return [pending for _, pending in sorted(results, key=lambda x: x[0])]

    def _step_failed(self, key: tuple[str, ...], steps: dict, exc: Exception) -> None:
        observe.close_steps(self, steps, f"internal error: {exc}")
        log.exception("step of chain %s failed", ",".join(key), exc_info=exc)
        for rid in list(self.chains[key].requests):
            self._fail(rid, f"internal error: {exc}")

    def _drain(self, block: bool) -> None:
        try:
            kind, value = self.intake.get(timeout=0.05) if block else self.intake.get_nowait()
            while True:
                if kind == "job":
                    if value.request_id not in self.jobs and all(j.request_id != value.request_id for j in self.waiting):
                        self._enqueue(value)  # a resume of a request still running here changes nothing
                elif kind == "cancel":
                    self.waiting = collections.deque(j for j in self.waiting if j.request_id != value)
                    self._finish(value)
                kind, value = self.intake.get_nowait()
        except queue.Empty:
            pass
        # Admit waiting jobs while every level has KV room for them.
        while self.waiting and len(self.jobs) < self.settings.engine.max_batch:
            self._start(self.waiting.popleft())
        # No room: a waiting job more urgent than a running one takes its place (vLLM's priority scheduling).
        while self.waiting and (victim := self._victim(self.waiting[0].priority)) is not None:
            self._preempt(victim)
            self._start(self.waiting.popleft())

    def _enqueue(self, msg: GenerateJob, first: bool = False) -> None:
        """Into the waiting queue behind every job of its priority or a lower (earlier) one;
        `first`: ahead of the jobs of its own priority (a preempted job, which came before them)."""
        at = len(self.waiting)
        while at and (self.waiting[at - 1].priority > msg.priority
                      or first and self.waiting[at - 1].priority == msg.priority):
            at -= 1
        self.waiting.insert(at, msg)

    def _victim(self, priority: int) -> Job | None:
        """The running job to preempt for a waiting one of `priority`: the least urgent of those
        less urgent than it, the latest admitted among equals; None when none is."""
        less = [job for job in self.jobs.values() if job.msg.priority > priority]
        return max(less, key=lambda job: (job.msg.priority, job.started)) if less else None

    def _preempt(self, job: Job) -> None:
        """Back to the waiting queue, its caches freed at every level. Between rounds everything
        the request emitted is committed, so it resumes from its prompt and those tokens
        (vLLM's preemption by recomputation): the same positions, so the same tokens."""
        rid = job.msg.request_id
        chain = self.chains.get(job.chain_key)
        req = chain.requests.get(rid) if chain is not None else None
        if req is not None:
            job.done += req.output[: job.sent]
            job.levels = feedback.merged(job, req)
            chain.release(rid)
        if (warm := self.warming.pop(rid, None)) is not None:  # its head stays in the cache: a later warm-up reuses it
            self.target.release(warm.request_id)
        job.sent = 0
        del self.jobs[rid]
        self.preempted[rid] = job
        job.paused = self.spans.open(rid, "preempted", {"specmesh.committed": len(job.done),
                                                        "specmesh.priority": job.msg.priority})
        self._enqueue(job.msg, first=True)
        if self.metrics is not None:
            self.metrics.preemptions.inc()
        log.info("request %s preempted after %d tokens (priority %d) for a more urgent one", rid, len(job.done),
                 job.msg.priority)

    def _start(self, msg: GenerateJob) -> None:
        if msg.request_id in self.jobs:
            return
        if (job := self.preempted.pop(msg.request_id, None)) is not None:  # resumes where it was preempted
            end(job.paused)
            job.paused = None
            self.jobs[msg.request_id] = job
            self._admit(job)
            return
        if not valid_request_id(msg.request_id):
            log.error("dropped job with unusable request id %r", msg.request_id[:80])
            return
        try:
            key = tuple(parse_chain(msg.chain))
            if key[-1] != "target":
                raise ValueError("the last level of a chain must be 'target'")
            SamplingParams.from_wire(msg.sampling)
        except ValueError as exc:
            self._reject(msg, str(exc))
            return
        job = Job(msg, key, done=list(msg.committed))
        observe.trace_admission(self, msg)
        # A resumed request starts a new term, so a presumed-dead driver's commits are fenced off.
        self.epochs[msg.request_id] = (msg.epoch // TERM + 1) * TERM if msg.committed or msg.epoch else 0
        self.jobs[msg.request_id] = job
        self._admit(job)

    def _admit(self, job: Job) -> None:
        """Into its chain now, or, when more of its prompt than `engine.prefill_chunk` is not in
        the prefix cache, into the warm-up first."""
        chunk, seq = self.settings.engine.prefill_chunk, job.msg.prompt + job.done
        scored = job.msg.prompt_logprobs >= 0 and not job.done  # prompt_logprobs: every prompt row is run anyway
        if chunk and getattr(self.target, "prefix_caching", False) and len(seq) - 1 > chunk and not scored:
            salt = SamplingParams.from_wire(job.msg.sampling).cache_salt
            if len(seq) - 1 - self.target.held_prefix(seq, salt) > chunk:
                self.warming[job.msg.request_id] = WarmUp(f"{job.msg.request_id}#warm")
                return
        self._add(job)

    def _warm(self) -> None:
        """Chunked prefill: the next chunk of the oldest warm-up's head into the target's cache.
        When the head (all but the last token) is in, the warm-up's slot is freed holding just
        it, and the job's chain prefill takes it as it is (prefix caching), running the last
        token only: the same keys and values as one forward, so the same tokens."""
        if not self.warming:
            return
        rid, warm = next(iter(self.warming.items()))
        job = self.jobs[rid]
        seq = job.msg.prompt + job.done
        head, chunk = len(seq) - 1, self.settings.engine.prefill_chunk
        span = self.spans.open(rid, "prefill chunk", {"specmesh.from": warm.written})
        try:
            if warm.written == 0:  # the first chunk starts where the cache's head of it ends
                params = SamplingParams.from_wire(job.msg.sampling).starting_at(len(job.msg.prompt))
                upto = min(self.target.held_prefix(seq[:head], params.cache_salt) + chunk, head)
                self.target.prefill(warm.request_id, seq[:upto], params)
                warm.cached, warm.first = self.target.cached_prefix(warm.request_id), upto
            else:
                upto = min(warm.written + chunk, head)
                self.target.extend(warm.request_id, seq[warm.written:upto])
            warm.written = upto
        except Exception as exc:  # noqa: BLE001 - the request fails, the driver goes on
            end(span, error=str(exc))
            log.exception("warm-up of %s failed", rid)
            self._fail(rid, f"internal error: {exc}")
            return
        end(span, to=upto, of=head)
        if warm.written < head:
            return
        del self.warming[rid]
        self.target.release(warm.request_id)  # freed holding just the head: the chain's prefill takes it
        self._add(job, warm)

    def _add(self, job: Job, warm: WarmUp | None = None) -> None:
        """`_join`, inside a `prefill` span of the request."""
        rid = job.msg.request_id
        span = self.spans.open(rid, "prefill", {"specmesh.chain": ",".join(job.chain_key)})
        previous = self.spans.enter(rid, span)
        try:
            self._join(job, warm)
        finally:
            self.spans.leave(rid, previous)
            end(span, chain=",".join(job.chain_key), epoch=self.epochs.get(rid, 0))

    def _join(self, job: Job, warm: WarmUp | None = None) -> None:
        """Put the job's request into the chain it can use now; retries without lost levels.
        `warm`: the warm-up that wrote its head (what the prefix cache really held is its `cached`)."""
        msg = job.msg
        # the output starts after the job's prompt, also when resumed from prompt + committed tokens
        params = SamplingParams.from_wire(msg.sampling).starting_at(len(msg.prompt))
        while True:
            key = self._available(job.chain_key)
            chain = self._chain(key)
            try:
                req = chain.add(msg.prompt + job.done, msg.max_tokens - len(job.done), params,
                                k=self._ks(msg, key), confidence_threshold=msg.confidence_threshold,
                                request_id=msg.request_id, stop_at_eos=msg.stop_at_eos, logprobs=msg.logprobs,
                                adaptive_depth=msg.adaptive_depth,
                                # a resume's prompt was scored by the first commit, which the state keeps
                                prompt_logprobs=msg.prompt_logprobs if not job.done else -1)
            except LevelUnavailable as exc:
                self._mark_down(exc.model)
                chain.release(msg.request_id)
                continue
            except Exception as exc:
                chain.release(msg.request_id)
                self._fail(msg.request_id, str(exc))
                return
            job.chain_key = key
            if warm is not None:  # the warm-up's head is no cache hit: count the prompt once, as one prefill
                self.target.prefix_queried -= warm.first
                self.target.prefix_hits -= self.target.cached_prefix(msg.request_id)
                req.cached_prompt = warm.cached
            self._publish_one(job, req)
            return

    def _mark_down(self, model: str) -> None:
        log.warning("level %s unavailable; chains go on without it for %.0fs", model, DOWN_FOR_S)
        self.down_until[model] = time.monotonic() + DOWN_FOR_S

    def _level_lost(self, key: tuple[str, ...], exc: LevelUnavailable) -> None:
        self._mark_down(exc.model)
        chain = self.chains[key]
        for rid, req in list(chain.requests.items()):
            job = self.jobs.get(rid)
            if job is None:
                continue
            # The failed step emitted nothing: the request's output so far is all committed.
            job.done += req.output[: job.sent]
            job.sent = 0
            job.levels = feedback.merged(job, req)
            chain.release(rid)
            self._add(job)

    def _publish(self, key: tuple[str, ...], finished) -> None:
        chain = self.chains[key]
        reqs = {r.request_id: r for r in finished} | dict(chain.requests)
        for rid, req in reqs.items():
            job = self.jobs.get(rid)
            if job is not None and job.chain_key == key:
                self._publish_one(job, req)

    def _publish_one(self, job: Job, req) -> None:
        """Commit the request's tokens emitted since the last call."""
        rid = job.msg.request_id
        new = req.output[job.sent:]
        if not new and not req.done:
            return
        logprobs = req.output_logprobs[job.sent:job.sent + len(new)]
        position = len(job.done) + job.sent
        job.sent += len(new)
        reason = None
        if req.done:
            reason = "length" if position + len(new) >= job.msg.max_tokens and not req.stopped else "stop"
        merged = feedback.merged(job, req)
        stats = {"chain": list(job.chain_key), "k": list(req.k),
                 "levels": [{"name": st.name, "drafted": st.drafted, "accepted": st.accepted,
                             "accepted_per_pos": list(st.accepted_per_pos),
                             "expected_acceptance": st.expected_acceptance}
                            for st in merged.values()],
                 # the prompt's head the target's cache held (prefix caching): usage's cached tokens
                 "cached_prompt_tokens": min(req.cached_prompt, len(job.msg.prompt))}
        observe.count(self, job, merged, len(new))
        self.stats_log.emitted(len(new))
        if job.first_token is None and new:
            job.first_token = time.perf_counter()
        if req.done:  # before the last commit: the outcome waits for its answer
            feedback.outcome(self, job, req, stats, reason)
        self.committer.commit(Commit(rid, self.epochs.get(rid, 0), position, list(new),
                                     prompt=job.msg.prompt if position == 0 else [],
                                     finished=req.done, worker=self.worker, finish_reason=reason, stats=stats,
                                     logprobs=logprobs, prompt_logprobs=req.prompt_logprobs if position == 0 else []),
                              self.spans.context(rid))
        if req.done:
            self._finish(rid)

    def _finish(self, rid: str) -> None:
        self.spans.forget(rid)
        self.arrivals.pop(rid, None)
        job = self.jobs.pop(rid, None) or self.preempted.pop(rid, None)
        if job is None:
            return
        end(job.paused)
        if (warm := self.warming.pop(rid, None)) is not None:
            self.target.release(warm.request_id)
        for chain in self.chains.values():
            if rid in chain.requests:
                chain.release(rid)
        for remote in self.remotes.values():
            remote.release(rid)
        self.epochs.pop(rid, None)
        self.committer.forget(rid)

    def _fail(self, rid: str, error: str) -> None:
        job = self.jobs.get(rid)
        if job is not None:
            self.committer.error(TokenBatch(rid, self.epochs.get(rid, 0), len(job.done) + job.sent, [], True,
                                            "error", error, worker=self.worker))
        self._finish(rid)

    def _reject(self, msg: GenerateJob, error: str) -> None:
        self.committer.error(TokenBatch(msg.request_id, msg.epoch, len(msg.committed), [], True, "error", error,
                                        worker=self.worker))


def independent(keys: list[tuple[str, ...]]) -> list[list[int]]:
    """Indices of `keys` (chains, bottom first) grouped so that no two groups share a lower
    level's model (`fused` counts as both its drafters; `ngram` and the target are each
    chain's own or the driver's): chains in different groups may propose at the same time."""
    groups: list[tuple[set[str], list[int]]] = []
    for i, key in enumerate(keys):
        models = {m for name in key[:-1] for m in models_of(name)}
        merged = (set(models), [i])
        for group in [g for g in groups if g[0] & models]:
            groups.remove(group)
            merged[0].update(group[0])
            merged[1].extend(group[1])
        groups.append(merged)
    return sorted((sorted(indices) for _, indices in groups), key=lambda g: g[0])
