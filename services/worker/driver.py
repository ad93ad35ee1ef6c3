"""The target's driver: runs chains whose lower levels live in other processes.

Jobs arrive from the gateway; one thread owns the target model and every `Chain` (one per
chain spec, continuously batched: new requests join between steps). Lower levels are
`RemoteRunner`s. After each step the newly emitted tokens of every request are committed
through the state service, which forwards them to the gateway. When a lower level stops
answering, its requests move to the chain without it (prefilled from prompt + output so
far) and it is left out for a while; the target is never left out.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from shared.engine.build import parse_chain
from shared.engine.chain import Chain
from shared.engine.ngram import NgramProposer
from shared.engine.runner import Runner
from shared.engine.sampling import SamplingParams
from shared.engine.stats import LevelStats
from shared.messages import (
    SUBJECT_COMMIT, SUBJECT_OUTCOME, SUBJECT_PROFILE, SUBJECT_TOKENS, Commit, GenerateJob, LevelOutcome, ModelStep,
    Outcome, RequestState, StepProfile, TokenBatch, decode, encode, valid_request_id,
)
from services.worker.remote import LevelUnavailable, RemoteRunner

log = logging.getLogger("specmesh.driver")

TERM = 1 << 20  # epoch = term * TERM + rollbacks within the term; a resumed request starts a new term
DOWN_FOR_S = 5.0


def canonical(name: str) -> str:
    return "drafter-code" if name == "drafter" else name


@dataclass
class Job:
    msg: GenerateJob
    chain_key: tuple[str, ...]
    done: list[int] = field(default_factory=list)  # output committed before the current chain request
    sent: int = 0  # output tokens of the current chain request handed to the committer
    levels: dict = field(default_factory=dict)  # LevelStats of chain requests before the current one
    started: float = field(default_factory=time.perf_counter)
    first_token: float | None = None


class Driver:
    """Owns the target runner and the chains; `submit` and `cancel` are thread-safe."""

    def __init__(self, worker: str, target: Runner, nc, loop: asyncio.AbstractEventLoop, settings):
        self.worker = worker
        self.target = target
        self.nc = nc
        self.loop = loop
        self.settings = settings
        self.intake: queue.Queue = queue.Queue()
        self.waiting: collections.deque[GenerateJob] = collections.deque()  # beyond max_batch, in order
        self.jobs: dict[str, Job] = {}
        self.chains: dict[tuple[str, ...], Chain] = {}
        self.epochs: dict[str, int] = {}
        self.remotes: dict[str, RemoteRunner] = {}
        self.down_until: dict[str, float] = {}
        self.committer = Committer(nc, worker, loop)
        self._last_profile = time.perf_counter()
        self._profiled: dict[str, tuple[int, float, int]] = {}
        self._batch_sum = self._batch_steps = 0  # requests per chain step, over the profile interval
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="driver", daemon=True)

    # -- called from the event loop ------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.intake.put(("wake", None))
        self.thread.join(timeout=10)

    def submit(self, job: GenerateJob) -> None:
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
                model, self.nc, self.loop, self.target.vocab_size, self.epochs, self.target.eos_token_id,
                max_len=self.settings.engine.max_len, on_rollback=self._bump,
            )
        return self.remotes[model]

    def _bump(self, request_id: str) -> None:
        self.epochs[request_id] = self.epochs.get(request_id, 0) + 1

    def _available(self, names: tuple[str, ...]) -> tuple[str, ...]:
        now = time.monotonic()
        return tuple(n for n in names if n == "target" or n == "ngram" or self.down_until.get(canonical(n), 0) <= now)

    def _chain(self, key: tuple[str, ...]) -> Chain:
        if key not in self.chains:
            levels = []
            for name in key:
                if name == "ngram":
                    levels.append((name, NgramProposer(self.target.vocab_size, device=self.target.device)))
                elif name == "target":
                    levels.append((name, self.target))
                else:
                    levels.append((name, self._remote(canonical(name))))
            spec = self.settings.speculation
            self.chains[key] = Chain(levels, k=spec.k, confidence_threshold=spec.confidence_threshold,
                                     leniency=spec.lenient, eos_token_id=self.target.eos_token_id)
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
        while not self._stop.is_set():
            self._drain(block=not self.jobs and not self.waiting)
            for key in list(self.chains):
                chain = self.chains[key]
                if not any(not r.done for r in chain.requests.values()):
                    continue
                self._batch_sum += len(chain.requests)
                self._batch_steps += 1
                try:
                    finished = chain.step()
                except LevelUnavailable as exc:
                    self._level_lost(key, exc)
                    continue
                except Exception as exc:  # a bug must fail the requests, never hang them
                    log.exception("step of chain %s failed", ",".join(key))
                    for rid in list(chain.requests):
                        self._fail(rid, f"internal error: {exc}")
                    continue
                self._publish(key, finished)
            self._profile()

    def _drain(self, block: bool) -> None:
        try:
            kind, value = self.intake.get(timeout=0.05) if block else self.intake.get_nowait()
            while True:
                if kind == "job":
                    if value.request_id not in self.jobs and all(j.request_id != value.request_id for j in self.waiting):
                        self.waiting.append(value)  # a resume of a request still running here changes nothing
                elif kind == "cancel":
                    self.waiting = collections.deque(j for j in self.waiting if j.request_id != value)
                    self._finish(value)
                kind, value = self.intake.get_nowait()
        except queue.Empty:
            pass
        # Admit waiting jobs while every level has KV room for them.
        while self.waiting and len(self.jobs) < self.settings.engine.max_batch:
            self._start(self.waiting.popleft())

    def _start(self, msg: GenerateJob) -> None:
        if msg.request_id in self.jobs:
            return
        if not valid_request_id(msg.request_id):
            log.error("dropped job with unusable request id %r", msg.request_id[:80])
            return
        try:
            key = tuple(parse_chain(msg.chain))
            if key[-1] != "target":
                raise ValueError("the last level of a chain must be 'target'")
            SamplingParams(msg.sampling.temperature, msg.sampling.top_p, msg.sampling.top_k, msg.sampling.seed)
        except ValueError as exc:
            self._reject(msg, str(exc))
            return
        job = Job(msg, key, done=list(msg.committed))
        # A resumed request starts a new term, so a presumed-dead driver's commits are fenced off.
        self.epochs[msg.request_id] = (msg.epoch // TERM + 1) * TERM if msg.committed or msg.epoch else 0
        self.jobs[msg.request_id] = job
        self._add(job)

    def _add(self, job: Job) -> None:
        """Put the job's request into the chain it can use now; retries without lost levels."""
        msg = job.msg
        params = SamplingParams(msg.sampling.temperature, msg.sampling.top_p, msg.sampling.top_k, msg.sampling.seed)
        while True:
            key = self._available(job.chain_key)
            chain = self._chain(key)
            try:
                req = chain.add(msg.prompt + job.done, msg.max_tokens - len(job.done), params,
                                k=self._ks(msg, key), confidence_threshold=msg.confidence_threshold,
                                request_id=msg.request_id, stop_at_eos=msg.stop_at_eos)
            except LevelUnavailable as exc:
                self._mark_down(exc.model)
                chain.release(msg.request_id)
                continue
            except Exception as exc:
                chain.release(msg.request_id)
                self._fail(msg.request_id, str(exc))
                return
            job.chain_key = key
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
            job.levels = self._merged(job, req)
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
        position = len(job.done) + job.sent
        job.sent += len(new)
        reason = None
        if req.done:
            reason = "length" if position + len(new) >= job.msg.max_tokens else "stop"
        stats = {"chain": list(job.chain_key), "k": list(req.k),
                 "levels": [{"name": st.name, "drafted": st.drafted, "accepted": st.accepted,
                             "accepted_per_pos": list(st.accepted_per_pos)}
                            for st in self._merged(job, req).values()]}
        self.committer.commit(Commit(rid, self.epochs.get(rid, 0), position, list(new),
                                     prompt=job.msg.prompt if position == 0 else [],
                                     finished=req.done, worker=self.worker, finish_reason=reason, stats=stats))
        if job.first_token is None and new:
            job.first_token = time.perf_counter()
        if req.done:
            self._outcome(job, req, stats, reason)
            self._finish(rid)

    def _outcome(self, job: Job, req, stats: dict, reason: str | None) -> None:
        """Tell the router how the finished request went."""
        now = time.perf_counter()
        tokens = len(job.done) + job.sent
        ttft = ((job.first_token or now) - job.started) * 1e3
        duration = (now - job.started) * 1e3
        key = job.chain_key
        above = {name: key[i + 1] for i, name in enumerate(key[:-1])}
        levels = [LevelOutcome(canonical(lv["name"]), canonical(above.get(lv["name"], "target")), lv["drafted"], lv["accepted"],
                               list(st.drafted_per_pos), lv["accepted_per_pos"])
                  for lv, st in zip(stats["levels"], self._merged(job, req).values())]
        outcome = Outcome(job.msg.request_id, job.msg.request_class, list(key), list(req.k), tokens,
                          len(job.msg.prompt), round(ttft, 3), round((duration - ttft) / max(tokens - 1, 1), 3),
                          round(duration, 3), levels, reason or "", self.worker)
        self._send(SUBJECT_OUTCOME, outcome)

    def _send(self, subject: str, message) -> None:
        data = encode(message)

        async def publish() -> None:
            try:
                await self.nc.publish(subject, data)
            except Exception as exc:  # feedback is best effort: the router also learns from the next one
                log.debug("feedback to %s not sent: %s", subject, exc)

        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(publish()))

    def _profile(self) -> None:
        """Every second: each model's forwards, seconds and tokens since the last report."""
        now = time.perf_counter()
        interval = now - self._last_profile
        if interval < 1.0:
            return
        self._last_profile = now
        runners = {"target": self.target} | {name: r for name, r in self.remotes.items()}
        batch = self._batch_sum / self._batch_steps if self._batch_steps else 0.0
        self._batch_sum = self._batch_steps = 0
        steps = []
        for name, runner in runners.items():
            totals = (runner.forwards, runner.forward_s, runner.forward_tokens)
            before = self._profiled.get(name, (0, 0.0, 0))
            self._profiled[name] = totals
            forwards = totals[0] - before[0]
            if forwards > 0:
                steps.append(ModelStep(name, str(getattr(runner, "device", "cpu")), forwards,
                                       round(totals[1] - before[1], 6), totals[2] - before[2], round(batch, 3)))
        if steps:
            self._send(SUBJECT_PROFILE, StepProfile(self.worker, round(interval, 3), len(self.jobs), len(self.waiting), steps))

    @staticmethod
    def _merged(job: Job, req) -> dict:
        """The request's per-level stats so far, across every chain it ran on."""
        out = {name: LevelStats(name) for name in job.levels}
        for part in (job.levels, req.stats):
            for name, st in part.items():
                acc = out.setdefault(name, LevelStats(name))
                acc.drafted += st.drafted
                acc.accepted += st.accepted
                for attr in ("accepted_per_pos", "drafted_per_pos"):
                    mine, theirs = getattr(acc, attr), getattr(st, attr)
                    mine.extend([0] * (len(theirs) - len(mine)))
                    for j, x in enumerate(theirs):
                        mine[j] += x
        return out

    def _finish(self, rid: str) -> None:
        job = self.jobs.pop(rid, None)
        if job is None:
            return
        for chain in self.chains.values():
            if rid in chain.requests:
                chain.release(rid)
        for remote in self.remotes.values():
            remote.release(rid)
        self.epochs.pop(rid, None)

    def _fail(self, rid: str, error: str) -> None:
        job = self.jobs.get(rid)
        if job is not None:
            self.committer.error(TokenBatch(rid, self.epochs.get(rid, 0), len(job.done) + job.sent, [], True,
                                            "error", error, worker=self.worker))
        self._finish(rid)

    def _reject(self, msg: GenerateJob, error: str) -> None:
        self.committer.error(TokenBatch(msg.request_id, msg.epoch, len(msg.committed), [], True, "error", error,
                                        worker=self.worker))


class Committer:
    """Sends each request's commits to the state service in order, retrying until it answers."""

    def __init__(self, nc, worker: str, loop: asyncio.AbstractEventLoop):
        self.nc = nc
        self.worker = worker
        self.loop = loop
        self.queues: dict[str, asyncio.Queue] = {}

    def commit(self, commit: Commit) -> None:
        self.loop.call_soon_threadsafe(self._enqueue, commit)

    def error(self, batch: TokenBatch) -> None:
        self.loop.call_soon_threadsafe(
            lambda: asyncio.ensure_future(self.nc.publish(f"{SUBJECT_TOKENS}.{batch.request_id}", encode(batch))))

    def _enqueue(self, commit: Commit) -> None:
        q = self.queues.get(commit.request_id)
        if q is None:
            q = self.queues[commit.request_id] = asyncio.Queue()
            asyncio.ensure_future(self._sender(commit.request_id, q))
        q.put_nowait(commit)

    async def _sender(self, rid: str, q: asyncio.Queue) -> None:
        while True:
            commit = await q.get()
            delay = 0.05
            deadline = time.monotonic() + 120
            while True:
                try:
                    msg = await self.nc.request(SUBJECT_COMMIT, encode(commit), timeout=2.0)
                    state = decode(msg.data, RequestState)
                    if state.error:
                        log.warning("commit of %s refused: %s", rid, state.error)
                    break
                except Exception as exc:  # state down or restarting: keep the commit, try again
                    if time.monotonic() > deadline:
                        log.error("commit of %s lost after 120s: %s", rid, exc)
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
            if commit.finished:
                self.queues.pop(rid, None)
                return
