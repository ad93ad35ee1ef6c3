"""Background responses (the Responses API's `background: true`): answered at once with
status `queued`, generated in a task of the gateway's own, followed in the response store.

The record goes `queued` -> `in_progress` (at the first token) -> the finished response
(`completed` / `incomplete`, written as any stored response is), or `failed` (with its
`error`; also when the gateway stops first), or `cancelled` (`POST
/v1/responses/{id}/cancel`). A cancelled record is never overwritten. A record still running past its deadline (the request timeout and a grace)
whose task is not in this gateway is settled as `failed`: the gateway that ran it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.gateway.generation import ApiError, Generation
from services.gateway.response_store import StoreError
from services.gateway.responses import ResponsesReply

log = logging.getLogger("specmesh.gateway")

GRACE_S = 30.0
RUNNING = ("queued", "in_progress")


class BackgroundResponses:
    """This gateway's background responses in flight, by response id."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task] = {}
        self.closing = False  # the gateway is stopping: what is cut is `failed`, not `cancelled`

    async def start(self, store, reply: ResponsesReply, generation: Generation, record: dict, timeout_s: float) -> dict:
        """Store the request as `queued` and start generating it; the queued response.

        A store that cannot take it is a StoreError before anything runs."""
        queued = reply.response("queued", [])
        record = record | {"jobs": [generation.job.request_id], "deadline": time.time() + timeout_s + GRACE_S}
        try:
            await store.put(reply.request_id, record | {"response": queued})
        except StoreError:
            if (release := getattr(generation.backend, "release", None)) is not None:
                release(generation.job.request_id)  # planned, never sent: no longer in flight
            raise
        task = asyncio.create_task(self._run(store, reply, generation, record))
        self.tasks[reply.request_id] = task
        task.add_done_callback(lambda _: self.tasks.pop(reply.request_id, None))
        return queued

    async def _run(self, store, reply: ResponsesReply, generation: Generation, record: dict) -> None:
        rid = reply.request_id
        try:
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
            await _write(store, rid, record, reply.response("failed", []) | {"error": {
                "code": error.get("code") or error.get("type"), "message": error.get("message")}})
        except Exception:
            log.exception("background response %s failed", rid)
            await _write(store, rid, record, reply.response("failed", []) | {"error": {
                "code": "server_error", "message": "Internal error; see the gateway's log."}})

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
        log.warning("background response %s: %s not stored: %s", rid, response.get("status"), exc)

