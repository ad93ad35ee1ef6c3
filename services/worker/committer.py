"""Commits of verified tokens to the state service: in order per request, retried until answered."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from shared.messages import SUBJECT_COMMIT, SUBJECT_TOKENS, Commit, RequestState, TokenBatch, decode, encode
from shared.tracing import SpanKind, end, inject, tracer

log = logging.getLogger("specmesh.driver")


class Committer:
    """Sends each request's commits to the state service in order, retrying until it answers."""

    def __init__(self, nc, worker: str, loop: asyncio.AbstractEventLoop, tracer_=None):
        self.nc = nc
        self.worker = worker
        self.loop = loop
        self.queues: dict[str, asyncio.Queue] = {}
        self.tracer = tracer_ or tracer(None)
        self.acked: dict[str, list] = {}  # request id -> [first ack, last ack, tokens] (perf_counter)
        self.on_finished: dict[str, Callable] = {}  # request id -> called with `acked` (None: not all acked)

    def when_finished(self, request_id: str, hook: Callable) -> None:
        """Call `hook(acked)` on the event loop once the request's last commit is answered.

        `acked` is `(first ack, last ack, tokens)` in `time.perf_counter` seconds: when the
        state service had made the tokens durable and sent them on, which is what a client
        waits for (None if a commit was refused or lost). Register before the last commit.
        """
        self.loop.call_soon_threadsafe(self.on_finished.__setitem__, request_id, hook)

    def commit(self, commit: Commit, trace=None) -> None:
        """Queue `commit`; `trace`: the context its `commit` span continues (None: no span)."""
        self.loop.call_soon_threadsafe(self._enqueue, commit, trace)

    def forget(self, request_id: str) -> None:
        """The request is gone from this worker (finished, cancelled, failed).

        Commits already queued are still sent; then its sender stops and what was kept for it
        is dropped. A request cancelled before its last commit has no finished commit to end
        its sender: without this, a task and its entries would stay for the worker's life.
        """
        self.loop.call_soon_threadsafe(self._forget, request_id)

    def _forget(self, rid: str) -> None:
        q = self.queues.get(rid)
        if q is not None:
            q.put_nowait(None)  # after what is queued: the sender ends there
        else:
            self.acked.pop(rid, None)
            self.on_finished.pop(rid, None)

    def error(self, batch: TokenBatch) -> None:
        self.loop.call_soon_threadsafe(
            lambda: asyncio.ensure_future(self.nc.publish(f"{SUBJECT_TOKENS}.{batch.request_id}", encode(batch))))

    def _enqueue(self, commit: Commit, trace=None) -> None:
        q = self.queues.get(commit.request_id)
        if q is None:
            q = self.queues[commit.request_id] = asyncio.Queue()
            asyncio.ensure_future(self._sender(commit.request_id, q))
        q.put_nowait((commit, trace))

    async def _sender(self, rid: str, q: asyncio.Queue) -> None:
        while True:
            item = await q.get()
            if item is None:  # forgotten with no finished commit
                if not q.empty():  # the request came back meanwhile (a resume here): carry on, in order
                    continue
                if self.queues.get(rid) is q:
                    del self.queues[rid]
                self.acked.pop(rid, None)
                self.on_finished.pop(rid, None)
                return
            commit, trace = item
            span = self._span(commit, trace)
            headers = inject(self.trace_context(span)) if span is not None else None
            delay = 0.05
            deadline = time.monotonic() + 120
            error = None
            while True:
                try:
                    msg = await self.nc.request(SUBJECT_COMMIT, encode(commit), timeout=2.0, headers=headers)
                    state = decode(msg.data, RequestState)
                    if state.error:
                        log.warning("commit of %s refused: %s", rid, state.error)
                        error = state.error
                    break
                except Exception as exc:  # state down or restarting: keep the commit, try again
                    if time.monotonic() > deadline:
                        log.error("commit of %s lost after 120s: %s", rid, exc)
                        error = f"lost after 120s: {exc}"
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
            end(span, error)
            if error is not None:
                self.acked[rid] = None  # a gap: these timings cannot be trusted
            elif commit.tokens and (rid not in self.acked or self.acked[rid] is not None):
                now = time.perf_counter()
                acked = self.acked.setdefault(rid, [now, now, 0])
                acked[1], acked[2] = now, acked[2] + len(commit.tokens)
            if commit.finished:
                if self.queues.get(rid) is q:
                    del self.queues[rid]
                acked = self.acked.pop(rid, None)
                hook = self.on_finished.pop(rid, None)
                if hook is not None:
                    try:
                        hook(tuple(acked) if acked else None)
                    except Exception:  # feedback must never stop commits
                        log.exception("finish hook of %s failed", rid)
                return

    def _span(self, commit: Commit, trace):
        if trace is None:
            return None
        return self.tracer.start_span("commit", context=trace, kind=SpanKind.CLIENT, attributes={
            "specmesh.request_id": commit.request_id, "specmesh.epoch": commit.epoch,
            "specmesh.position": commit.position, "specmesh.tokens": len(commit.tokens),
            "specmesh.finished": commit.finished})

    @staticmethod
    def trace_context(span):
        from opentelemetry.trace import set_span_in_context

        return set_span_in_context(span)
