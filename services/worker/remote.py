"""A `Runner` whose model lives in another process: the chain's view of a remote level.

The target's driver thread calls it exactly like a local runner; each call becomes one
`LevelCall` over NATS carrying every request of the batch. It mirrors the tokens the
remote cache holds, so a rollback costs no message of its own (the next call carries the
new epoch and position) and a replacement replica can rebuild from `context`.
Greedy and seeded levels return their choices only; the distributions they imply are
rebuilt here as one-hot rows, which verification treats exactly as the full ones.

A request's prefill costs no call of its own: the prompt rides as `context` on the
request's first call (its first proposal or score, batched with the other requests'),
which the replica opens the cache from. So a new request's first token waits for the
target's prefill alone, and the driver's round is not held up by a round trip per level
while a request joins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Sequence

import nats.errors
import torch

from services.worker.level_server import MISSING, unpack_probs
from shared.engine.runner import Draft, Runner
from shared.engine.sampling import SamplingParams
from shared.messages import SUBJECT_LEVEL, BadMessage, LevelCall, LevelItem, LevelReply, Sampling, decode, encode
from shared.tracing import SpanKind, end, traceparent

log = logging.getLogger("specmesh.remote")


class LevelUnavailable(RuntimeError):
    """No replica of a level answered; the chain must go on without it."""

    def __init__(self, model: str, why: str):
        super().__init__(f"level {model} unavailable: {why}")
        self.model = model


class RemoteRunner(Runner):
    def __init__(self, model: str, nc, loop: asyncio.AbstractEventLoop, vocab_size: int,
                 epochs: dict[str, int], eos_token_ids: tuple[int, ...] = (), max_len: int = 512, timeout_s: float = 10.0,
                 on_rollback: Callable[[str], None] | None = None, spans=None, lookahead: bool = False):
        self.device = torch.device("cpu")
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else None
        self.max_len = max_len  # the replicas run with the same engine settings
        super().__init__()
        self.model = model
        self.nc = nc
        self.loop = loop
        self.timeout_s = timeout_s
        self.epochs = epochs  # shared with the driver: one epoch per request across levels
        self.on_rollback = on_rollback
        self.mirror: dict[str, list[int]] = {}
        self.unopened: set[str] = set()  # prefilled here, not yet on a replica: the next call carries the context
        self.wire: dict[str, Sampling] = {}
        self.replica: str | None = None  # sticky replica: its KV holds our requests
        self.spans = spans  # shared.tracing.RequestSpans of the driver, or None
        self.lookahead = lookahead  # draft the next round while the level above verifies
        self.ahead: dict[str, tuple] = {}  # request id -> (item, future reply, index in it)
        self.ahead_used = 0
        self.call_s = 0.0  # wall time the driver waited on calls (hops and the replica's forwards)
        self.calls = 0  # answered calls, and their time beyond the replica's forwards
        self.hop_s = 0.0

    # -- transport -----------------------------------------------------------------------
    def _request(self, subject: str, call: LevelCall) -> LevelReply:
        async def go() -> bytes:
            msg = await self.nc.request(subject, encode(call), timeout=self.timeout_s)
            return msg.data

        t0 = time.perf_counter()
        try:
            data = asyncio.run_coroutine_threadsafe(go(), self.loop).result(self.timeout_s + 1)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError,
                nats.errors.ConnectionClosedError) as exc:
            raise LevelUnavailable(self.model, type(exc).__name__) from None
        finally:
            self.call_s += time.perf_counter() - t0
        try:
            reply = decode(data, LevelReply)
        except BadMessage as exc:
            raise LevelUnavailable(self.model, f"bad reply: {exc}") from None
        if reply.error:
            raise LevelUnavailable(self.model, reply.error)
        # What the call cost beyond the replica's forwards: NATS both ways, codecs, queueing.
        self.calls += 1
        self.hop_s += max(0.0, time.perf_counter() - t0 - reply.step_ms / 1e3)
        return reply

    def _call(self, op: str, items: list[LevelItem], want_probs: bool = False) -> LevelReply:
        """`_exchange`, with a span per traced request whose traceparent rides on its item."""
        spans = []
        if self.spans is not None and self.spans.roots:
            for item in items:
                span = self.spans.open(item.request_id, f"{op} {self.model}", {
                    "specmesh.level": self.model, "specmesh.epoch": item.epoch, "specmesh.position": item.position,
                    "specmesh.tokens": len(item.tokens), "specmesh.batch_size": len(items)}
                    | ({"specmesh.k": item.k} if op == "propose" else {}), kind=SpanKind.CLIENT)
                item.trace = traceparent(span)
                spans.append(span)
        try:
            reply = self._exchange(op, items, want_probs)
        except LevelUnavailable as exc:
            for span in spans:
                end(span, str(exc))
            raise
        for span, res in zip(spans, reply.results):
            end(span, replica=reply.worker, length=res.length, returned=len(res.tokens))
        return reply

    def _exchange(self, op: str, items: list[LevelItem], want_probs: bool = False) -> LevelReply:
        """Send to the sticky replica; on its loss, or a replica without our KV, rebuild on any."""
        call = LevelCall(op, items, want_probs)
        if self.replica is not None:
            try:
                reply = self._request(f"{SUBJECT_LEVEL}.{self.model}.{self.replica}", call)
                if not any(r.error == MISSING for r in reply.results):
                    return self._check(reply)
            except LevelUnavailable as exc:
                log.warning("%s replica %s lost (%s); rebuilding on another", self.model, self.replica, exc)
        for item in items:  # any replica can rebuild the cache from the mirrored context
            item.context = list(self.mirror.get(item.request_id, []))
            item.sampling = self.wire.get(item.request_id)
        reply = self._request(f"{SUBJECT_LEVEL}.{self.model}", call)
        self.replica = reply.worker
        return self._check(reply)

    def _check(self, reply: LevelReply) -> LevelReply:
        for res in reply.results:
            if res.error:
                raise LevelUnavailable(self.model, f"{res.request_id}: {res.error}")
        return reply

    def _item(self, rid: str, tokens: Sequence[int] = (), k: int = 0, threshold: float = 0.0) -> LevelItem:
        item = LevelItem(rid, self.epochs.get(rid, 0), len(self.mirror[rid]), list(tokens), k, threshold)
        if rid in self.unopened:  # the replica opens the request from its context, then serves the call
            item.context, item.sampling = list(self.mirror[rid]), self.wire[rid]
        return item

    def _opened(self, items: Sequence[LevelItem]) -> int:
        """Mark the items' requests as held by the replica; the context tokens it prefilled."""
        tokens = 0
        for item in items:
            if item.request_id in self.unopened:
                self.unopened.discard(item.request_id)
                tokens += len(item.context)
        return tokens

    def _want_probs(self, ids: Sequence[str]) -> bool:
        return any(not (self._sampling[r].greedy or self._sampling[r].seeded) for r in ids)

    def _onehot(self, tokens: Sequence[int]) -> torch.Tensor:
        rows = torch.zeros(len(tokens), self.vocab_size)
        if tokens:
            rows[torch.arange(len(tokens)), torch.tensor(list(tokens))] = 1.0
        return rows

    # -- the Runner interface ------------------------------------------------------------
    def length(self, request_id: str) -> int:
        return len(self.mirror[request_id])

    def prefill(self, request_id: str, tokens: Sequence[int], sampling: SamplingParams = SamplingParams()) -> torch.Tensor:
        """Take the request; its first call carries `tokens` for the replica to open it from.

        The returned row is unused by chains (the target's counts)."""
        sampling = sampling.starting_at(len(tokens))
        self._sampling[request_id] = sampling
        self.wire[request_id] = sampling.to_wire()
        self.mirror[request_id] = list(tokens)
        self.unopened.add(request_id)
        return torch.zeros(self.vocab_size)

    def propose(self, request_ids, feeds, k, confidence_threshold=0.0) -> list[Draft]:
        n = len(request_ids)
        ks = [k] * n if isinstance(k, int) else list(k)
        ths = [confidence_threshold] * n if isinstance(confidence_threshold, (int, float)) else list(confidence_threshold)
        want = self._want_probs(request_ids)
        drafts: dict[str, Draft] = {}
        for rid, feed, kk, th in zip(request_ids, feeds, ks, ths):
            ahead = self._take_ahead(rid, feed, kk, th, want)
            if ahead is not None:
                drafts[rid] = ahead
        todo = [(r, f, kk, t) for r, f, kk, t in zip(request_ids, feeds, ks, ths) if r not in drafts]
        if todo:
            items = [self._item(r, f, kk, t) for r, f, kk, t in todo]
            reply = self._call("propose", items, want)
            opened = self._opened(items)
            for (rid, feed, _, _), res in zip(todo, reply.results):
                self.mirror[rid] = (self.mirror[rid] + list(feed) + res.tokens)[: res.length]
                probs = unpack_probs(res.probs, res.rows, self.vocab_size) if want else self._onehot(res.tokens)
                drafts[rid] = Draft(res.tokens, probs, res.confidence)
            self._account(reply, opened + sum(len(t[1]) for t in todo) + sum(len(drafts[t[0]].tokens) for t in todo))
        out = [drafts[rid] for rid in request_ids]
        if self.lookahead:
            self._draft_ahead(request_ids, out, ks, ths, want)
        return out

    # -- drafting ahead while the level above verifies -----------------------------------
    def _draft_ahead(self, request_ids, drafts: list[Draft], ks, ths, want: bool) -> None:
        """Ask the replica for the next k + 1 tokens as if every draft were accepted; don't wait.

        The level above then verifies while this replica drafts. If it accepts all k drafts
        and its bonus token is the first of these, the next `propose` is already answered
        (the other k tokens); otherwise they are dropped: the next call's position moves the
        replica's cache back, and nothing drafted ahead is ever used under a stale context.
        """
        if self.replica is None:
            return
        items = [LevelItem(rid, self.epochs.get(rid, 0), len(self.mirror[rid]), [d.tokens[-1]], kk + 1, th)
                 for rid, d, kk, th in zip(request_ids, drafts, ks, ths) if kk > 0 and len(d.tokens) == kk]
        if not items:
            return
        call = encode(LevelCall("propose", items, want))
        subject = f"{SUBJECT_LEVEL}.{self.model}.{self.replica}"
        future = asyncio.run_coroutine_threadsafe(self.nc.request(subject, call, timeout=self.timeout_s), self.loop)
        for index, item in enumerate(items):
            self.ahead[item.request_id] = (item, future, index)

    def _take_ahead(self, rid: str, feed, k: int, threshold: float, want: bool) -> Draft | None:
        """The drafts already drafted ahead for this call, if they continue exactly this context."""
        entry = self.ahead.pop(rid, None)
        if entry is None:
            return None
        item, future, index = entry
        if (item.position != len(self.mirror[rid]) or len(feed) != 2 or feed[0] != item.tokens[0]
                or k > item.k - 1 or threshold != item.confidence_threshold):
            return None
        try:
            reply = decode(future.result(self.timeout_s + 1).data, LevelReply)
        except Exception:  # a lost or failed look-ahead costs only the regular call
            return None
        res = reply.results[index] if index < len(reply.results) else None
        if reply.error or res is None or res.error or len(res.tokens) < 2 or res.tokens[0] != feed[1]:
            return None
        use = res.tokens[1 : 1 + k]
        # The replica holds the feed and the drafts but the last (at least): a prefix is what we claim.
        self.mirror[rid] = self.mirror[rid] + list(feed) + use[:-1]
        probs = unpack_probs(res.probs, res.rows, self.vocab_size)[1 : 1 + k] if want else self._onehot(use)
        self._account(reply, len(feed) + len(use))
        self.ahead_used += 1
        return Draft(use, probs, res.confidence[1 : 1 + k])

    def score(self, request_ids, chunks) -> list[torch.Tensor]:
        items = [self._item(r, c) for r, c in zip(request_ids, chunks)]
        want = self._want_probs(request_ids)
        reply = self._call("score", items, want)
        opened = self._opened(items)
        out = []
        for rid, chunk, res in zip(request_ids, chunks, reply.results):
            self.mirror[rid] = self.mirror[rid] + list(chunk)
            out.append(unpack_probs(res.probs, res.rows, self.vocab_size) if res.probs else self._onehot(res.tokens))
        self._account(reply, opened + sum(len(c) for c in chunks))
        return out

    def rollback(self, request_id: str, length: int) -> None:
        """Logical: the next call carries the new epoch and the shorter position."""
        mirror = self.mirror[request_id]
        if not 0 <= length <= len(mirror):
            raise ValueError(f"cannot roll {request_id!r} back to {length}: {self.model} holds {len(mirror)}")
        if length < len(mirror):
            del mirror[length:]
            if self.on_rollback:
                self.on_rollback(request_id)

    def release(self, request_id: str) -> None:
        """Forget the request here and tell the replica (fire and forget)."""
        self.ahead.pop(request_id, None)
        self._sampling.pop(request_id, None)
        self.wire.pop(request_id, None)
        unopened = request_id in self.unopened
        self.unopened.discard(request_id)
        if self.mirror.pop(request_id, None) is None or self.replica is None or unopened:
            return
        call = LevelCall("release", [LevelItem(request_id, self.epochs.get(request_id, 0), 0)])
        subject = f"{SUBJECT_LEVEL}.{self.model}.{self.replica}"
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._publish(subject, call)))

    async def _publish(self, subject: str, call: LevelCall) -> None:
        try:
            await self.nc.request(subject, encode(call), timeout=2.0)
        except Exception as exc:  # a release lost to a dead replica frees nothing that still exists
            log.debug("release to %s not sent: %s", subject, exc)

    def _account(self, reply: LevelReply, tokens: int) -> None:
        self.forwards += 1
        self.forward_s += reply.step_ms / 1e3
        self.forward_tokens += tokens
