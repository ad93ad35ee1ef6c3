"""Background responses (the Responses API's `background: true`): answered at once with
status `queued`, generated in a task of the gateway's own, followed in the response store.

The record goes `queued` -> `in_progress` (at the first token) -> the finished response
(`completed` / `incomplete`, written as any stored response is), or `failed` (with its
`error`; also when the gateway stops first), or `cancelled` (`POST
/v1/responses/{id}/cancel`). A cancelled record is never overwritten. A record still running past its deadline (the request timeout and a grace)
whose task is not in this gateway is settled as `failed`: the gateway that ran it stopped.

With `stream: true` too, the events are written to an `EventLog` as they are made: the
POST streams them from the first (`response.created` and `response.queued` at once), and
`GET /v1/responses/{id}?stream=true&starting_after=N` streams them again from the one after
sequence number N, so a client that lost its connection resumes where it was. A client
that goes away stops nothing. The log lives in the gateway generating the response, and
stays `EVENTS_KEPT_S` after the response ends (at most `EVENTS_KEPT` ended logs).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from services.gateway.choices import merged
from services.gateway.generation import ApiError, Generation
from services.gateway.response_store import StoreError
from services.gateway.responses import ResponsesReply

logger = logging.getLogger("specmesh.gateway")

GRACE_S = 30.0
RUNNING = ("queued", "in_progress")
EVENTS_KEPT_S = 600.0
EVENTS_KEPT = 256


class EventLog:
    """A streamed background response's events in order (index = sequence_number), for
    every reader: each reads from where it says, then waits for the next until the log closes."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.closed_at: float | None = None
        self._signal = asyncio.Event()

    def append(self, event: str) -> None:
        self.events.append(event)
        self._wake()

    def close(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()
            self._wake()

    def _wake(self) -> None:
        self._signal.set()
        self._signal = asyncio.Event()

    async def read(self, after: int = -1) -> AsyncIterator[str]:
        """The events whose sequence number is above `after`, then each new one, until the log closes."""
        at = max(after + 1, 0)
        while True:
            signal = self._signal  # taken before looking: an append after the look sets it
            if at < len(self.events):
                batch = self.events[at:]
                at += len(batch)
                for event in batch:
                    yield event
            elif self.closed_at is not None:
                return
            else:
                await signal.wait()


class BackgroundResponses:
    """This gateway's background responses in flight, by response id."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task] = {}
        self.logs: dict[str, EventLog] = {}  # the streamed ones' events, running and lately ended
        self.closing = False  # the gateway is stopping: what is cut is `failed`, not `cancelled`

    def events(self, response_id: str) -> EventLog | None:
        """The event log of a streamed background response this gateway runs or lately ran."""
        return self.logs.get(response_id)

    def _prune(self) -> None:
        ended = sorted((log.closed_at, rid) for rid, log in self.logs.items() if log.closed_at is not None)
        now = time.monotonic()
        for n, (closed_at, rid) in enumerate(ended):
            if now - closed_at > EVENTS_KEPT_S or len(ended) - n > EVENTS_KEPT:
                del self.logs[rid]

    async def start(self, store, reply: ResponsesReply, generation: Generation, record: dict, timeout_s: float,
                    stream: bool = False) -> dict:
        """Store the request as `queued` and start generating it; the queued response.
        `stream`: its events are kept in an `EventLog` (`events`), which opens with the queued response.

        A store that cannot take it is a StoreError before anything runs."""
        queued = reply.response("queued", [])
        record = record | {"jobs": [generation.job.request_id], "deadline": time.time() + timeout_s + GRACE_S}
        try:
            await store.put(reply.request_id, record | {"response": queued})
        except StoreError:
            if (release := getattr(generation.backend, "release", None)) is not None:
                release(generation.job.request_id)  # planned, never sent: no longer in flight
            raise
        log = None
        if stream:
            self._prune()
            log = self.logs[reply.request_id] = EventLog()
            log.append(reply.event("response.created", response=queued))
            log.append(reply.event("response.queued", response=queued))
        task = asyncio.create_task(self._run(store, reply, generation, record, log))
        self.tasks[reply.request_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(reply.request_id, None))
        return queued

    async def _run(self, store, reply: ResponsesReply, generation: Generation, record: dict,
                   log: EventLog | None = None) -> None:
        rid = reply.request_id
        try:
            if log is not None:
                await self._stream(store, reply, generation, record, log)
                return
            started = False
            async for _ in generation.deltas():
                if not started:
                    started = True
                    await _write(store, rid, record, reply.response("in_progress", []))
            await reply.whole([generation.outcome])  # stored by the reply's `keep`, unless cancelled meanwhile
        except asyncio.CancelledError:
            if self.closing:
                await _write(store, rid, record, reply.response("failed", []) | {"error": {
                    "code": "server_error", "message": "The gateway stopped before this response was finished; "
                                                       "send the request again."}})
            else:
                await _write(store, rid, record, reply.response("cancelled", []), force=True)
            raise
        except ApiError as exc:
            error = exc.body()["error"]
            if log is not None:
                log.append(reply.failed(error))
            await _write(store, rid, record, reply.response("failed", []) | {"error": {
                "code": error.get("code") or error.get("type"), "message": error.get("message")}})
        except Exception:
            logger.exception("background response %s failed", rid)
            if log is not None:
                log.append(reply.failed({"message": "Internal error; see the gateway's log.", "code": "server_error"}))
            await _write(store, rid, record, reply.response("failed", []) | {"error": {
                "code": "server_error", "message": "Internal error; see the gateway's log."}})
        finally:
            if log is not None:
                log.close()

    async def _stream(self, store, reply: ResponsesReply, generation: Generation, record: dict, log: EventLog) -> None:
        """The response's events into `log`; the record `in_progress` at the first token, the
        finished response stored by the reply's `keep`, `failed` if the stream ends in an error."""
        deltas = merged([generation])
        try:
            first = await anext(deltas, None)  # an error before the first token is raised here
            await _write(store, reply.request_id, record, reply.response("in_progress", []))
            async for event in reply.events(generation, first, deltas, created=False):
                log.append(event)
        finally:
            await deltas.aclose()
        if reply.error is not None:
            await _write(store, reply.request_id, record, reply.response("failed", []) | {"error": {
                "code": reply.error.get("code") or reply.error.get("type"), "message": reply.error.get("message")}})

    async def cancel(self, store, backend, record: dict) -> dict:
        """Stop a background response (here, or on the gateway running it) and give it back `cancelled`;
        one already finished is given back as it is."""
        response = record["response"]
        rid = response["id"]
        if response["status"] not in RUNNING:
            return response
        task = self.tasks.get(rid)
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=10)
        else:  # another gateway's: the targets stop it, and the record says so first
            await _write(store, rid, record, response | {"status": "cancelled"}, force=True)
            for job in record.get("jobs", []):
                await backend.cancel(job)
        current = await store.get(rid)
        return current["response"] if current else response | {"status": "cancelled"}

    async def settle(self, store, record: dict) -> dict:
        """The record, `failed` if it is still running past its deadline with no task here."""
        response = record["response"]
        if response.get("status") in RUNNING and response["id"] not in self.tasks \
                and time.time() > record.get("deadline", float("inf")):
            record = record | {"response": response | {"status": "failed", "error": {
                "code": "server_error", "message": "The gateway generating this response stopped before it "
                                                   "finished; send the request again."}}}
            await _write(store, response["id"], record, record["response"])
        return record

    async def close(self) -> None:
        """Stop what is still running (the gateway is stopping): each is recorded `failed`."""
        self.closing = True
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def keeps_cancelled(store, keep):
    """`keep` (which stores a finished response) for a background response: it leaves a
    cancelled record as it is."""
    async def guarded(final: dict) -> None:
        current = await _read(store, final["id"])
        if current is not None and current["response"].get("status") == "cancelled":
            return
        await keep(final)
    return guarded


async def _read(store, rid: str) -> dict | None:
    try:
        return await store.get(rid)
    except StoreError:
        return None


async def _write(store, rid: str, record: dict, response: dict, force: bool = False) -> None:
    """The record with this response, unless the stored one was cancelled (and this is not `force`)."""
    if not force:
        current = await _read(store, rid)
        if current is not None and current["response"].get("status") == "cancelled":
            return
    try:
        await store.put(rid, record | {"response": response})
    except StoreError as exc:
        logger.warning("background response %s: %s not stored: %s", rid, response.get("status"), exc)

