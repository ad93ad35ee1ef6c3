"""The state service: the authority on each request's committed tokens and epoch.

A target's driver sends every verified batch as a `Commit`. The commit is accepted only if
its epoch is not older than the request's (fencing off a driver presumed dead) and its
position continues the committed tokens exactly (a repeat is acknowledged once, a gap is
refused). Accepted tokens are written to a JetStream key-value bucket before they are
forwarded to the gateway, so a restarted service (or a resumed request) carries on from
the committed prefix and a client never sees a token that is not durable. Finished and
cancelled requests are deleted; abandoned ones expire with the bucket's TTL.

Log-probabilities are stored apart, one key per commit (`StoredLogprobs` in a bucket of
their own, `<request id>.<position>`), listed by the record (`logprob_segments`): a commit
writes its own and the record, whose size grows by one int per commit, where rewriting
them all made every commit cost the whole request's (1024 tokens with 5 alternatives:
7.5 ms to encode, at every commit).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from nats.js.errors import KeyNotFoundError

from shared.messages import (
    SUBJECT_CANCEL, SUBJECT_COMMIT, SUBJECT_STATE_GET, SUBJECT_TOKENS, BadMessage, Cancel, Commit, RequestState,
    StateQuery, StoredLogprobs, TokenBatch, decode, encode, valid_request_id,
)
from shared.metrics import StateMetrics
from shared.nats_auth import KV_BUCKET, KV_LOGPROBS_BUCKET
from shared.service import ServiceProcess
from shared.tracing import continued, fail, tracer

log = logging.getLogger("specmesh.state")

TTL_S = 600
# A record lives while it is written to; a segment is written once, so it outlives the
# longest generation (the request's timeout is a setting) by this much.
LOGPROBS_TTL_S = 3600


class StateService(ServiceProcess):
    name = "state"
    description = "SpecMesh request state: committed tokens, epochs, rollbacks"

    async def setup(self) -> None:
        self.js = self.nc.jetstream()
        self.kv = await self.js.create_key_value(bucket=KV_BUCKET, ttl=TTL_S, history=1)
        self.logprobs_kv = await self.js.create_key_value(bucket=KV_LOGPROBS_BUCKET, ttl=LOGPROBS_TTL_S, history=1)
        self._cleanups: set[asyncio.Task] = set()
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
        if state.logprob_segments:
            await self._read_logprobs(state)
        self.cache[request_id] = state
        return state

    async def _read_logprobs(self, state: RequestState) -> None:
        """Fill a record read from the bucket with its stored log-probabilities; a missing
        segment (expired) leaves them out from there on, as for a job that never asked."""
        for position in state.logprob_segments:
            try:
                stored = decode((await self.logprobs_kv.get(f"{state.request_id}.{position}")).value, StoredLogprobs)
            except (KeyNotFoundError, BadMessage) as exc:
                log.warning("log-probabilities of %s at %d unreadable: %s", state.request_id, position, exc)
                return
            if position == 0:
                state.prompt_logprobs = stored.prompt_logprobs
            if position == len(state.logprobs):
                state.logprobs.extend(stored.logprobs)

    async def _store(self, state: RequestState, position: int, logprobs: list, prompt_logprobs: list) -> None:
        """Write a commit's log-probabilities (if any), then the record that lists them."""
        if not state.logprob_segments and len(state.logprobs) > len(logprobs):  # a record from before segments
            logprobs, prompt_logprobs, position = list(state.logprobs), list(state.prompt_logprobs), 0
        if logprobs or prompt_logprobs:
            await self.logprobs_kv.put(f"{state.request_id}.{position}",
                                       encode(StoredLogprobs(state.request_id, position, logprobs, prompt_logprobs)))
            state.logprob_segments.append(position)
        await self.kv.put(state.request_id, encode(replace(state, logprobs=[], prompt_logprobs=[])))

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
        kept = aligned and len(state.logprobs) == have  # kept with the tokens, so a resume loses none
        if kept:
            state.logprobs.extend(logprobs)
        state.committed.extend(fresh)
        state.epoch = commit.epoch
        state.finished = commit.finished
        if state.finished:
            await self._forget(rid)
        else:
            self.cache[rid] = state
            await self._store(state, have, logprobs if kept else [], state.prompt_logprobs if have == 0 else [])
        batch = TokenBatch(rid, state.epoch, have, fresh, commit.finished, commit.finish_reason,
                           stats=commit.stats, worker=commit.worker, logprobs=logprobs,
                           prompt_logprobs=state.prompt_logprobs if have == 0 else [])
        await self.nc.publish(f"{SUBJECT_TOKENS}.{rid}", encode(batch))
        return state

    async def _forget(self, request_id: str) -> None:
        state = self.cache.pop(request_id, None)
        try:
            await self.kv.delete(request_id)
        except Exception as exc:  # expiry will remove it anyway
            log.debug("delete %s: %s", request_id, exc)
        if state is not None and state.logprob_segments:  # off the commit path; expiry is the fallback
            task = asyncio.create_task(self._delete_logprobs(request_id, list(state.logprob_segments)))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def _delete_logprobs(self, request_id: str, positions: list[int]) -> None:
        for position in positions:
            try:
                await self.logprobs_kv.delete(f"{request_id}.{position}")
            except Exception as exc:
                log.debug("delete %s.%d: %s", request_id, position, exc)

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
