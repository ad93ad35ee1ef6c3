"""The state service: the authority on each request's committed tokens and epoch.

A target's driver sends every verified batch as a `Commit`. The commit is accepted only if
its epoch is not older than the request's (fencing off a driver presumed dead) and its
position continues the committed tokens exactly (a repeat is acknowledged once, a gap is
refused). Accepted tokens are written to a JetStream key-value bucket before they are
forwarded to the gateway, so a restarted service (or a resumed request) carries on from
the committed prefix and a client never sees a token that is not durable. Finished and
cancelled requests are deleted; abandoned ones expire with the bucket's TTL.
"""

from __future__ import annotations

import logging

from nats.js.errors import KeyNotFoundError

from shared.messages import (
    SUBJECT_CANCEL, SUBJECT_COMMIT, SUBJECT_STATE_GET, SUBJECT_TOKENS, BadMessage, Cancel, Commit, RequestState,
    StateQuery, TokenBatch, decode, encode, valid_request_id,
)
from shared.metrics import StateMetrics
from shared.service import ServiceProcess
from shared.tracing import continued, fail, tracer

log = logging.getLogger("specmesh.state")

BUCKET = "specmesh_requests"
TTL_S = 600


class StateService(ServiceProcess):
    name = "state"
    description = "SpecMesh request state: committed tokens, epochs, rollbacks"

    async def setup(self) -> None:
        self.js = self.nc.jetstream()
        self.kv = await self.js.create_key_value(bucket=BUCKET, ttl=TTL_S, history=1)
        self.cache: dict[str, RequestState] = {}
        self.metrics = StateMetrics(self.registry)
        self.tracer = tracer(self.tracer_provider)
        await self.micro.add_endpoint(name="commit", subject=SUBJECT_COMMIT, handler=self._on_commit, queue_group="state")
        await self.micro.add_endpoint(name="get", subject=SUBJECT_STATE_GET, handler=self._on_get, queue_group="state")
        self._cancel_sub = await self.nc.subscribe(SUBJECT_CANCEL, cb=self._on_cancel)

    async def load(self, request_id: str) -> RequestState | None:
        if request_id in self.cache:
            return self.cache[request_id]
        try:
            entry = await self.kv.get(request_id)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        state = decode(entry.value, RequestState)
        self.cache[request_id] = state
        return state

    async def apply(self, commit: Commit) -> RequestState:
        """Validate and record one commit; the new state, or one whose `error` says why not."""
        rid = commit.request_id
        if not valid_request_id(rid):
            return RequestState(rid, found=False, error="request id must match [-_=.a-zA-Z0-9]{1,200}")
        state = await self.load(rid)
        if state is None:
            if commit.position != 0:
                return RequestState(rid, found=False, error="unknown request; first commit must be at position 0")
            state = RequestState(rid, commit.epoch, list(commit.prompt), [], prompt_logprobs=list(commit.prompt_logprobs))
        if commit.epoch < state.epoch:
            return RequestState(rid, state.epoch, committed=[], error=f"stale epoch {commit.epoch} < {state.epoch}")
        end = commit.position + len(commit.tokens)
        have = len(state.committed)
        if commit.position > have:
            return RequestState(rid, state.epoch, error=f"gap: commit at {commit.position}, {have} committed")
        if end <= have and not (commit.finished and not state.finished):
            if state.committed[commit.position:end] != commit.tokens:
                return RequestState(rid, state.epoch, error="conflicting repeat of committed tokens")
            return state  # a retry of what is already recorded
        if state.committed[commit.position:have] != commit.tokens[: have - commit.position]:
            return RequestState(rid, state.epoch, error="conflicting repeat of committed tokens")
        fresh = commit.tokens[have - commit.position:]
        aligned = len(commit.logprobs) == len(commit.tokens)
        logprobs = commit.logprobs[have - commit.position:] if aligned else []
        if aligned and len(state.logprobs) == have:  # kept with the tokens, so a resume loses none
            state.logprobs.extend(logprobs)
        state.committed.extend(fresh)
        state.epoch = commit.epoch
        state.finished = commit.finished
        if state.finished:
            await self._forget(rid)
        else:
            self.cache[rid] = state
            await self.kv.put(rid, encode(state))
        batch = TokenBatch(rid, state.epoch, have, fresh, commit.finished, commit.finish_reason,
                           stats=commit.stats, worker=commit.worker, logprobs=logprobs,
                           prompt_logprobs=state.prompt_logprobs if have == 0 else [])
        await self.nc.publish(f"{SUBJECT_TOKENS}.{rid}", encode(batch))
        return state

    async def _forget(self, request_id: str) -> None:
        self.cache.pop(request_id, None)
        try:
            await self.kv.delete(request_id)
        except Exception as exc:  # expiry will remove it anyway
            log.debug("delete %s: %s", request_id, exc)

    async def _on_commit(self, request) -> None:
        try:
            commit = decode(request.data, Commit)
        except BadMessage as exc:
            log.error("dropped bad commit: %s", exc)
            await request.respond(encode(RequestState("", found=False, error=f"bad message: {exc}")))
            return
        with continued(self.tracer, "commit", request.headers, attributes={
                "specmesh.request_id": commit.request_id, "specmesh.epoch": commit.epoch,
                "specmesh.position": commit.position, "specmesh.tokens": len(commit.tokens),
                "specmesh.finished": commit.finished}) as span:
            state = await self.apply(commit)
            if state.error:
                fail(span, state.error)
        self.metrics.commits.labels("refused" if state.error else "accepted").inc()
        if not state.error:
            self.metrics.tokens.inc(len(commit.tokens))
        if state.error:
            log.warning("commit %s@%d refused: %s", commit.request_id, commit.position, state.error)
        reply = RequestState(state.request_id, state.epoch, [], [], state.finished, state.found, state.error)
        await request.respond(encode(reply))

    async def _on_get(self, request) -> None:
        try:
            query = decode(request.data, StateQuery)
        except BadMessage as exc:
            await request.respond(encode(RequestState("", found=False, error=f"bad message: {exc}")))
            return
        state = await self.load(query.request_id) if valid_request_id(query.request_id) else None
        await request.respond(encode(state or RequestState(query.request_id, found=False)))

    async def _on_cancel(self, msg) -> None:
        try:
            cancel = decode(msg.data, Cancel)
        except BadMessage as exc:
            log.error("dropped bad cancel: %s", exc)
            return
        if valid_request_id(cancel.request_id):
            await self._forget(cancel.request_id)

    async def teardown(self) -> None:
        await self._cancel_sub.unsubscribe()
