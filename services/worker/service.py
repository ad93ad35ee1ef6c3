"""The model worker process: hosts one model of the chain in a role (drafter, verifier, target).

Drafters and verifiers serve their runner to the target's driver (`LevelServer`) on
`specmesh.level.<model>` (queue group: any replica) and `specmesh.level.<model>.<worker>`
(this replica, which holds the KV of the requests it has seen). The target runs the
`Driver`, taking jobs from `specmesh.generate` (queue group "target"). Model work runs on
one thread per process, beside the event loop that does the messaging.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from shared.messages import (
    SUBJECT_CANCEL, SUBJECT_GENERATE, SUBJECT_LEVEL, BadMessage, Cancel, GenerateJob, LevelCall, LevelReply,
    RequestState, decode, encode,
)
from shared.service import ServiceProcess
from shared.settings import Settings
from shared.tracing import SpanKind, extract, fail, from_traceparent, tracer

log = logging.getLogger("specmesh.worker")

MODEL_FOR_ROLE = {"drafter": "drafter-code", "verifier": "verifier", "target": "target"}


class WorkerService(ServiceProcess):
    role: str = "target"
    description = "SpecMesh model worker"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        from shared.models.family import resolve_family

        self.family = resolve_family(settings)
        self.model = settings.engine.model or MODEL_FOR_ROLE[self.role]
        self.model_path = self.family.path(self.model)
        self.worker = f"{self.role}-{uuid.uuid4().hex[:8]}"
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="model")

    def metadata(self) -> dict[str, str]:
        engine = self.settings.engine
        return {"role": self.role, "model": self.model, "path": str(self.model_path), "worker": self.worker,
                "device": engine.device, "dtype": engine.dtype, "threads": str(engine.threads)}

    def load_runner(self):
        import torch

        from shared.engine.runner import load_runner

        engine = self.settings.engine
        torch.set_num_threads(engine.threads)
        return load_runner(self.model_path, engine.runner, engine.device, engine.dtype, engine.max_batch, engine.max_len,
                           prefix_caching=engine.prefix_caching)

    async def prepare(self) -> None:
        self.runner = await asyncio.get_running_loop().run_in_executor(self.executor, self.load_runner)

    async def setup(self) -> None:
        loop = asyncio.get_running_loop()
        runner = self.runner
        if self.role == "target":
            await self._setup_driver(runner, loop)
        else:
            await self._setup_level(runner)
        log.info("%s serving %s from %s", self.worker, self.model, self.model_path)

    # -- drafter / verifier --------------------------------------------------------------
    async def _setup_level(self, runner) -> None:
        from services.worker.level_server import LevelServer

        self.level = LevelServer(runner, self.worker)
        from shared.metrics import LevelMetrics

        self.metrics = LevelMetrics(self.registry)
        self.metrics.kv.watch(self.model, runner)
        self.tracer = tracer(self.tracer_provider)
        group = f"{SUBJECT_LEVEL}.{self.model}"
        await self.micro.add_endpoint(name="level", subject=group, handler=self._on_level, queue_group=self.model)
        await self.micro.add_endpoint(name="level-sticky", subject=f"{group}.{self.worker}", handler=self._on_level,
                                      queue_group=self.worker)

    async def _on_level(self, request) -> None:
        try:
            call = decode(request.data, LevelCall)
        except BadMessage as exc:
            log.error("dropped bad level call: %s", exc)
            await request.respond(encode(LevelReply(self.worker, [], error=f"bad message: {exc}")))
            return
        loop = asyncio.get_running_loop()
        started = time.time_ns()
        try:
            reply = await loop.run_in_executor(self.executor, self.level.handle, call)
        except Exception as exc:  # the caller learns why; this replica keeps serving
            log.exception("level call %s failed", call.op)
            reply = LevelReply(self.worker, [], error=f"{type(exc).__name__}: {exc}")
        await request.respond(encode(reply))
        self._observe_level(call, reply, started)

    def _observe_level(self, call: LevelCall, reply: LevelReply, started: int) -> None:
        """Metrics of one call, and a span per traced item (children of the driver's, one batch's times)."""
        done = time.time_ns()
        self.metrics.calls.labels(self.model, call.op).inc()
        self.metrics.batch_size.labels(self.model, call.op).observe(len(call.items))
        self.metrics.seconds.labels(self.model, call.op).observe((done - started) / 1e9)
        results = {r.request_id: r for r in reply.results}
        for item in call.items:
            parent = from_traceparent(item.trace)
            if parent is None:
                continue
            res = results.get(item.request_id)
            span = self.tracer.start_span(f"{call.op} {self.model}", context=parent, kind=SpanKind.SERVER,
                                          start_time=started, attributes={
                                              "specmesh.level": self.model, "specmesh.worker": self.worker,
                                              "specmesh.epoch": item.epoch, "specmesh.position": item.position,
                                              "specmesh.batch_size": len(call.items),
                                              "specmesh.returned": len(res.tokens) if res is not None else 0})
            error = reply.error or (res.error if res is not None else "no result")
            if error:
                fail(span, error)
            span.end(end_time=done)

    # -- target --------------------------------------------------------------------------
    async def _setup_driver(self, runner, loop) -> None:
        from services.worker.driver import Driver

        from shared.metrics import DriverMetrics

        self.driver = Driver(self.worker, runner, self.nc, loop, self.settings, self.tracer_provider,
                             DriverMetrics(self.registry))
        self.driver.start()
        await self.micro.add_endpoint(name="generate", subject=SUBJECT_GENERATE, handler=self._on_job, queue_group="target")
        self._cancel_sub = await self.nc.subscribe(SUBJECT_CANCEL, cb=self._on_cancel)

    async def _on_job(self, request) -> None:
        try:
            job = decode(request.data, GenerateJob)
        except BadMessage as exc:
            log.error("dropped bad job: %s", exc)
            await request.respond(encode(RequestState("", found=False, error=f"bad message: {exc}")))
            return
        self.driver.submit(job, extract(request.headers))
        await request.respond(encode(RequestState(job.request_id)))

    async def _on_cancel(self, msg) -> None:
        try:
            cancel = decode(msg.data, Cancel)
        except BadMessage as exc:
            log.error("dropped bad cancel: %s", exc)
            return
        self.driver.cancel(cancel.request_id)

    async def teardown(self) -> None:
        if self.role == "target" and hasattr(self, "driver"):
            self.driver.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)


def worker_for_role(role: str) -> type[WorkerService]:
    """A WorkerService subclass registered on NATS under the role's name."""
    return type(f"{role.title()}Worker", (WorkerService,), {"name": role, "role": role})
