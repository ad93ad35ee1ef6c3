"""What the gateway's APIs call to generate: a job in, committed token batches out.

`NatsBackend` sends the job to a target worker over NATS and yields its `TokenBatch`es in
order, de-duplicated by position (a resumed request may resend a batch), resuming on
another target replica if the one serving the request dies.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import AsyncIterator, Protocol

from shared.messages import GenerateJob, TokenBatch

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """A generation failed for a reason the client should see (message is user-facing)."""


class NoTargetError(GenerationError):
    """No target worker took the job just now (none subscribed, or none answered in time)."""


class Backend(Protocol):
    model_name: str
    max_context: int  # longest prompt + max_tokens a request may ask for

    def tokenizer(self):
        """The family's transformers tokenizer (shared by every model of the chain)."""

    def chains(self) -> list[list[str]]:
        """Chains a request may ask for, bottom level first."""

    def generate(self, job: GenerateJob) -> AsyncIterator[TokenBatch]:
        """Committed tokens of `job`, in order; raises GenerationError on failure."""

    async def cancel(self, request_id: str) -> None:
        """Stop a generation (client gone, stop string hit); frees its KV everywhere."""


def _template(tok, path) -> str:
    """The chat template in `path`, checked by rendering one user message (ValueError naming the file)."""
    try:
        template = path.read_text(encoding="utf-8")
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template, tokenize=False,
                                add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - unreadable, not Jinja, or failing on the simplest chat
        raise ValueError(f"gateway.chat_template {path}: {type(exc).__name__}: {exc}") from None
    return template


def table_for(table, in_flight: int):
    """The part of the router's `Assignments` for `in_flight` requests of this gateway.

    The current table, unless those requests per target worker reach a load table above the
    load the current one was decided at: then the highest such table (a burst this gateway
    sees before the router's next publication does). One gateway sees only its own requests.
    """
    load = in_flight / max(1, table.targets)
    chosen = table
    for candidate in table.by_load:
        if table.batch < candidate.min_batch <= load:
            chosen = candidate
    return chosen


SUBMIT_ATTEMPTS = 3  # a job's submission is sent again while the connection to NATS was cut (a restart)


class NatsBackend:
    """Generation through the target workers over NATS (see docs/protocol.md)."""

    stall_s = 15.0  # no committed batch for this long: resume the request on another target

    def __init__(self, settings, nc, tracer_provider=None, metrics=None):
        from shared.models.family import resolve_family
        from shared.tracing import tracer

        self.settings = settings
        self.model_names = list(settings.gateway.served_model_names)  # requests may name any; answers give the first
        self.model_name = self.model_names[0]
        self.nc = nc
        self.tracer = tracer(tracer_provider)  # Generation's spans
        self.metrics = metrics  # shared.metrics.GatewayMetrics: Generation records latencies
        self.family = resolve_family(settings)
        self.max_context = settings.engine.max_len
        self._tokenizer = None
        self.table = None  # the router's newest Assignments
        self.in_flight: dict[str, float] = {}  # request id -> when it was planned, until its generation ends

    async def follow_router(self) -> None:
        """Cache the router's assignment table: no router round trip on the request path."""
        from shared.messages import SUBJECT_ASSIGNMENTS, Assignments, BadMessage, decode

        async def on_table(msg) -> None:
            try:
                table = decode(msg.data, Assignments)
            except BadMessage:
                return
            if self.table is None or table.version >= self.table.version:
                self.table = table

        self._router_sub = await self.nc.subscribe(SUBJECT_ASSIGNMENTS, cb=on_table)

    def assignment(self, request_class: str):
        """The router's chain and k for `request_class`, or None before the router has spoken.

        From the table for the load this gateway's requests in flight make with this one
        (`table_for`): a burst takes the router's under-load assignments at once, not a
        publication later.
        """
        if self.table is None:
            return None
        chosen = table_for(self.table, len(self.in_flight) + 1)
        for entry in chosen.assignments:
            if entry.request_class == request_class:
                return entry
        return chosen.default

    def admit(self, request_id: str) -> None:
        """Count a planned request in flight until its generation ends (`release`); one planned
        but never generated (its client gone first) stops counting after the request timeout."""
        now = time.monotonic()
        horizon = now - self.settings.gateway.request_timeout_s
        self.in_flight = {rid: t for rid, t in self.in_flight.items() if t >= horizon}
        self.in_flight[request_id] = now

    def release(self, request_id: str) -> None:
        self.in_flight.pop(request_id, None)

    def tokenizer(self):
        """The target's tokenizer, with `gateway.chat_template` in place of its own if set."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(self.family.path("target")))
            path = self.settings.gateway.chat_template
            if path is not None:
                tok.chat_template = _template(tok, path)
            self._tokenizer = tok
        return self._tokenizer

    @functools.cached_property
    def generation_defaults(self):
        """The target's recommended sampling defaults (`gateway.generation_config`), read once."""
        from services.gateway.generation_defaults import GenerationDefaults

        defaults = GenerationDefaults.load(self.settings.gateway.generation_config, self.family.path("target"))
        if defaults.given():
            log.info("sampling defaults from %s (a request's own values win): %s", defaults.source,
                     ", ".join(f"{k}={v}" for k, v in defaults.given().items()))
        return defaults

    def chains(self) -> list[list[str]]:
        out = []
        for bottom in ([], ["ngram"]):
            for drafter in ([], ["drafter"], ["drafter-code"], ["drafter-prose"], ["fused"]):
                for verifier in ([], ["verifier"]):
                    if not (bottom and drafter == ["fused"]):  # fused is a bottom level itself
                        out.append(bottom + drafter + verifier + ["target"])
        return out

    async def _submit(self, job: GenerateJob) -> None:
        import nats.errors

        from shared.messages import SUBJECT_GENERATE, RequestState, decode, encode
        from shared.tracing import inject

        for attempt in range(SUBMIT_ATTEMPTS):
            reconnects = self._reconnects()
            try:
                msg = await self.nc.request(SUBJECT_GENERATE, encode(job), timeout=5.0, headers=inject() or None)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
                # The connection to NATS was cut while the job was on its way (a restart): the
                # job or its answer may be lost, and the target may not have subscribed again
                # yet. Send it again: a target ignores a job it already runs or holds.
                if self._reconnects() != reconnects or getattr(self.nc, "is_reconnecting", False):
                    if attempt + 1 < SUBMIT_ATTEMPTS:
                        await asyncio.sleep(0.5)
                        continue
                if isinstance(exc, nats.errors.NoRespondersError):
                    raise NoTargetError("no target worker is available; retry shortly") from None
                raise NoTargetError("no target worker accepted the request in 5s; retry shortly") from None
        ack = decode(msg.data, RequestState)
        if ack.error:
            raise GenerationError(ack.error)

    def _reconnects(self) -> int:
        return getattr(self.nc, "stats", {}).get("reconnects", 0)

    async def _committed(self, request_id: str):
        from shared.messages import SUBJECT_STATE_GET, RequestState, StateQuery, decode, encode

        try:
            msg = await self.nc.request(SUBJECT_STATE_GET, encode(StateQuery(request_id)), timeout=2.0)
            return decode(msg.data, RequestState)
        except Exception:  # state unreachable: resume from what this gateway received
            return None

    async def generate(self, job: GenerateJob) -> AsyncIterator[TokenBatch]:
        import asyncio

        from shared.messages import SUBJECT_TOKENS, decode

        inbox: asyncio.Queue = asyncio.Queue()
        sub = await self.nc.subscribe(f"{SUBJECT_TOKENS}.{job.request_id}", cb=inbox.put)
        received: list[int] = list(job.committed)
        finished = False
        deadline = time.monotonic() + self.settings.gateway.request_timeout_s
        try:
            await self._submit(job)
            while not finished:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GenerationError(f"generation exceeded {self.settings.gateway.request_timeout_s:.0f}s")
                try:
                    msg = await asyncio.wait_for(inbox.get(), timeout=min(self.stall_s, remaining))
                except asyncio.TimeoutError:
                    state = await self._committed(job.request_id)
                    epoch = job.epoch
                    if state is not None and state.found:
                        extra = state.committed[len(received):]
                        logprobs = state.logprobs[len(received):] if len(state.logprobs) == len(state.committed) else []
                        epoch = state.epoch
                        if extra:
                            received += extra
                            position = len(received) - len(extra)
                            yield TokenBatch(job.request_id, epoch, position, extra, logprobs=logprobs,
                                             prompt_logprobs=state.prompt_logprobs if position == 0 else [])
                    job = GenerateJob(**{**job.__dict__, "committed": list(received), "epoch": epoch})
                    try:
                        await self._submit(job)
                    except NoTargetError:
                        # NATS restarting, or every target too: what is committed is kept and the
                        # request is offered again after the next stall, until its deadline.
                        pass
                    continue
                batch = decode(msg.data, TokenBatch)
                if batch.error:
                    raise GenerationError(batch.error)
                if batch.position > len(received):
                    continue  # a gap cannot come from the state service; ignore a stray batch
                seen = len(received) - batch.position
                fresh = batch.tokens[seen:]
                received += fresh
                finished = batch.finished
                batch.position, batch.tokens, batch.logprobs = len(received) - len(fresh), fresh, batch.logprobs[seen:]
                yield batch
        finally:
            self.release(job.request_id)
            await sub.unsubscribe()
            if not finished:
                await self.cancel(job.request_id)

    async def cancel(self, request_id: str) -> None:
        from shared.messages import SUBJECT_CANCEL, Cancel, encode

        try:
            await self.nc.publish(SUBJECT_CANCEL, encode(Cancel(request_id)))
        except Exception:  # disconnected: targets drop abandoned requests on their own
            pass
