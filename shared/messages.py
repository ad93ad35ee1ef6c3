"""Every message SpecMesh services exchange over NATS, msgpack-encoded and versioned.

Rules: a message is a dataclass here and nowhere else; fields may be added (with a
default) but never renamed or given a new meaning; `V` is the wire version every message
carries as `v`; a decoder refuses a newer major version, malformed bytes, unknown types and
wrong field types with `BadMessage`, whose text says what was wrong. Every message about a
request carries its request id and epoch, and where it concerns tokens, their position.

Subjects (see docs/protocol.md):

    specmesh.generate               GenerateJob     gateway -> target (queue group "target")
    specmesh.tokens.<request_id>    TokenBatch      target  -> gateway
    specmesh.cancel                 Cancel          gateway -> every target (broadcast)
    specmesh.level.<role>           LevelCall       target  -> drafter/verifier (queue group)
    specmesh.level.<role>.<worker>  LevelCall       target  -> one replica (sticky)
    specmesh.state.commit           Commit          target  -> state
    specmesh.state.get              StateQuery      anyone  -> state
    specmesh.feedback.outcome       Outcome         target  -> router
    specmesh.feedback.profile       StepProfile     target  -> router
    specmesh.router.assignments     Assignments     router  -> gateway (cached there)
    specmesh.router.explain         ExplainQuery    anyone  -> router (reply: Explanation)
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

V = 1
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

SUBJECT_GENERATE = "specmesh.generate"
SUBJECT_TOKENS = "specmesh.tokens"
SUBJECT_CANCEL = "specmesh.cancel"
SUBJECT_LEVEL = "specmesh.level"
SUBJECT_COMMIT = "specmesh.state.commit"
SUBJECT_STATE_GET = "specmesh.state.get"
SUBJECT_ASSIGNMENTS = "specmesh.router.assignments"
SUBJECT_OUTCOME = "specmesh.feedback.outcome"
SUBJECT_PROFILE = "specmesh.feedback.profile"
SUBJECT_EXPLAIN = "specmesh.router.explain"


REQUEST_ID = re.compile(r"^[-_=.a-zA-Z0-9]{1,200}$")  # usable in a NATS subject and as a JetStream key


def valid_request_id(request_id: str) -> bool:
    return bool(REQUEST_ID.match(request_id))


class BadMessage(ValueError):
    """Bytes that are not a valid message of the expected type; the text says why."""


@dataclass
class Sampling:
    """How the target's distribution becomes tokens (shared.engine.sampling.SamplingParams)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    logit_bias_ids: list[int] = field(default_factory=list)  # token ids, each with the bias at its index
    logit_bias_values: list[float] = field(default_factory=list)
    output_start: int = -1  # where the output starts in the request's sequence (-1: after the prompt it is opened with)
    min_tokens: int = 0  # no end of sequence (nor stop token) before the output holds this many tokens
    stop_token_ids: list[int] = field(default_factory=list)  # tokens that end the output, as the end of sequence does
    response_format: str = ""  # "json_object": the output is one JSON object (shared.engine.grammar); "": free text
    json_schema: str = ""  # response_format "json_schema": the schema (JSON text) the object follows (shared.engine.json_schema)
    regex: str = ""  # response_format "regex": the expression the whole output matches (shared.engine.regex)
    cache_salt: str = ""  # prompt heads cached by the model services are shared only between requests of one salt
    min_p: float = 0.0  # tokens less likely than min_p times the likeliest are dropped (after temperature); 0: off
    allowed_token_ids: list[int] = field(default_factory=list)  # only these may be sampled; empty: every token


MAX_TOP_LOGPROBS = 20  # most alternatives per token a job may ask for (OpenAI's chat API allows 20)


@dataclass
class TokenLogprob:
    """One emitted token's log-probability under the target, and the likeliest tokens at its position."""

    logprob: float
    top_ids: list[int] = field(default_factory=list)  # likeliest first
    top_logprobs: list[float] = field(default_factory=list)
    rank: int = 0  # 1 + how many tokens were likelier at its position (0: not reported)


@dataclass
class GenerateJob:
    """One generation, from the gateway to a target worker."""

    TYPE: ClassVar[str] = "generate"
    request_id: str
    prompt: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    chain: list[str] = field(default_factory=lambda: ["target"])  # bottom level first
    k: list[int] = field(default_factory=list)  # per proposing level
    confidence_threshold: float = 0.0
    stop_at_eos: bool = True
    request_class: str = ""
    # Resume after a target failure: tokens already committed (the state service's record).
    committed: list[int] = field(default_factory=list)
    epoch: int = 0
    slo_tpot_ms: float = 0.0  # the client's TPOT objective (0: none): recorded against the outcome
    # -1: no log-probabilities; n >= 0: each token's, and the n likeliest at its position (<= MAX_TOP_LOGPROBS)
    logprobs: int = -1
    prompt_logprobs: int = -1  # the same for the prompt's tokens after the first (echo), from the target's prefill
    priority: int = 0  # lower is admitted first from a target's waiting queue (vLLM's); equal ones in arrival order
    adaptive_depth: bool = False  # k was not pinned by the client: a round may verify fewer drafts (SpecServe's per-step k)


@dataclass
class TokenBatch:
    """Committed tokens of one request, in order; `position` is the index of the first in the output."""

    TYPE: ClassVar[str] = "tokens"
    request_id: str
    epoch: int
    position: int
    tokens: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # per level: drafted, accepted, ...
    worker: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token when the job asked (else empty)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # with the batch at position 0, when asked


@dataclass
class Cancel:
    TYPE: ClassVar[str] = "cancel"
    request_id: str
    reason: str = "cancelled"


@dataclass
class LevelItem:
    """One request's part of a LevelCall."""

    request_id: str
    epoch: int
    position: int  # the cache length the caller expects before `tokens` are written
    tokens: list[int] = field(default_factory=list)  # prefill: the prompt; propose/score: the feed
    k: int = 0
    confidence_threshold: float = 0.0
    sampling: Sampling | None = None  # with prefill
    context: list[int] = field(default_factory=list)  # the whole sequence, when the replica must rebuild
    trace: str = ""  # W3C traceparent of this request's span (a batch carries several traces; shared.tracing)


@dataclass
class LevelCall:
    """A batched operation on a drafter's or verifier's runner."""

    TYPE: ClassVar[str] = "level"
    op: str  # "prefill" | "propose" | "score" | "rollback" | "release"
    items: list[LevelItem]
    want_probs: bool = False  # full distributions back (unseeded sampling, leniency)


@dataclass
class LevelResult:
    """One request's part of a LevelReply."""

    request_id: str
    length: int  # the cache length after the operation
    tokens: list[int] = field(default_factory=list)  # propose: drafts; score: each position's choice
    confidence: list[float] = field(default_factory=list)
    probs: bytes = b""  # float16 [rows, vocab] when want_probs
    rows: int = 0
    error: str | None = None  # "stale epoch", "unknown request", ...


@dataclass
class LevelReply:
    TYPE: ClassVar[str] = "level-reply"
    worker: str
    results: list[LevelResult]
    vocab_size: int = 0
    step_ms: float = 0.0
    error: str | None = None


@dataclass
class Commit:
    """Tokens the target verified, to be recorded as committed (fenced by epoch)."""

    TYPE: ClassVar[str] = "commit"
    request_id: str
    epoch: int
    position: int
    tokens: list[int]
    prompt: list[int] = field(default_factory=list)  # with the first commit
    finished: bool = False
    worker: str = ""
    finish_reason: str | None = None  # with finished: "stop" | "length"
    stats: dict[str, Any] = field(default_factory=dict)  # with finished: per-level speculation stats
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token when the job asked (else empty)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # with the first commit, when asked


@dataclass
class StateQuery:
    TYPE: ClassVar[str] = "state-query"
    request_id: str


@dataclass
class RequestState:
    """The state service's record of one request."""

    TYPE: ClassVar[str] = "state"
    request_id: str
    epoch: int = 0
    prompt: list[int] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)
    finished: bool = False
    found: bool = True
    error: str | None = None
    # one per committed token while every commit carried them (a job that asked), else shorter
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # from the first commit, when asked
    # In the state service's bucket: the positions of the commits whose log-probabilities are
    # stored apart (`StoredLogprobs`, one key each); empty: any are inline above.
    logprob_segments: list[int] = field(default_factory=list)


@dataclass
class StoredLogprobs:
    """One commit's log-probabilities as the state service stores them, apart from the
    request's record, so a commit writes only its own (the record's size stays linear)."""

    TYPE: ClassVar[str] = "stored-logprobs"
    request_id: str
    position: int  # of the first token they belong to
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # at position 0, when asked


@dataclass
class LevelOutcome:
    """What one proposing level of a finished request drafted and got accepted."""

    name: str  # the proposer, e.g. "drafter-code"
    verifier: str  # the level above it
    drafted: int = 0
    accepted: int = 0
    drafted_per_pos: list[int] = field(default_factory=list)
    accepted_per_pos: list[int] = field(default_factory=list)
    overlap: float = 0.0  # sampling: sum over draft positions of 1 - TV(verifier's p, proposer's q)
    overlap_positions: int = 0


@dataclass
class Outcome:
    """A finished request, as the target's driver saw it: feedback for the router."""

    TYPE: ClassVar[str] = "outcome"
    request_id: str
    request_class: str
    chain: list[str]
    k: list[int]
    tokens: int
    prompt_tokens: int
    ttft_ms: float
    tpot_ms: float
    duration_ms: float
    levels: list[LevelOutcome] = field(default_factory=list)
    finish_reason: str = ""
    worker: str = ""
    batch_mean: float = 0.0  # requests per target round over the request's life (0: not measured)
    slo_tpot_ms: float = 0.0  # the request's own TPOT objective (0: none; the router's setting applies)
    # Share of its target rounds that also verified other chains: such a round waits for every
    # chain's proposal, so its TPOT is not this chain's own (0: none, or not measured).
    mixed_share: float = 0.0
    # Rounds by the drafts the per-round depth policy let the target verify (index = drafts,
    # 0..k[-1]); empty when the policy did not steer the request (its rounds verified k[-1]).
    depths: list[int] = field(default_factory=list)


DRIVER = "driver"  # ModelStep.model of the driver's own work per round (forwards = rounds, tokens = requests)
HOP = "hop"  # ModelStep.model of level calls beyond the replica's forwards (forwards = calls, tokens = calls x batch)


@dataclass
class ModelStep:
    """Forward passes of one model over a reporting interval (or one of the pseudo-models above)."""

    model: str
    device: str
    forwards: int
    seconds: float
    tokens: int  # tokens written (a verify chunk counts all its tokens)
    batch_size: float  # mean requests per forward over the interval


@dataclass
class StepProfile:
    """Step timings a target's driver measured for every model of its chains."""

    TYPE: ClassVar[str] = "profile"
    worker: str
    interval_s: float
    live_requests: int
    waiting_requests: int
    steps: list[ModelStep] = field(default_factory=list)


@dataclass
class Candidate:
    """One chain with its best k and predicted ms per token (an assignment's alternatives)."""

    chain: list[str]
    k: list[int]
    predicted_ms_per_token: float


@dataclass
class Assignment:
    """The chain and k the router assigns to one request class."""

    request_class: str
    chain: list[str]
    k: list[int]
    predicted_ms_per_token: float | None = None
    reason: str = ""
    # The cost ranking (best k per chain, cheapest first, a few): a request with its own TPOT
    # objective takes the cheapest predicted to meet it when the assignment is not. Under load
    # (reason "shared": one chain for every class) it is that chain alone.
    alternatives: list[Candidate] = field(default_factory=list)


@dataclass
class LoadTable:
    """The assignments the router would make at a higher load than the current one.

    A gateway that has at least `min_batch` requests per target worker in flight itself
    (a burst the router has not seen yet) takes this table instead of the current one.
    """

    min_batch: float  # from this many requests in flight per target worker
    batch: float  # the load it was decided at
    assignments: list[Assignment] = field(default_factory=list)
    default: Assignment | None = None


@dataclass
class Assignments:
    """The router's current table; the gateway caches the newest version."""

    TYPE: ClassVar[str] = "assignments"
    version: int
    assignments: list[Assignment] = field(default_factory=list)
    default: Assignment | None = None  # for classes without an entry
    batch: float = 1.0  # the mean batch per target worker the table was decided at
    targets: int = 0  # target workers reporting their load (0: none yet)
    by_load: list[LoadTable] = field(default_factory=list)  # loads above `batch`, lowest first


@dataclass
class ExplainQuery:
    """Ask the router why it assigns what it does (`specmesh router explain`)."""

    TYPE: ClassVar[str] = "explain"
    request_class: str = ""  # empty: every class


@dataclass
class Explanation:
    """The router's reasoning: per class, every candidate's predicted ms/token and its inputs."""

    TYPE: ClassVar[str] = "explanation"
    version: int
    classes: dict[str, Any] = field(default_factory=dict)  # class -> {"winner", "reason", "candidates": [...]}
    load: dict[str, Any] = field(default_factory=dict)  # batch size, step-time fits, served models
    store: dict[str, Any] = field(default_factory=dict)  # buffered, written, dropped rows, database up
    error: str | None = None


MESSAGE_TYPES = {cls.TYPE: cls for cls in (GenerateJob, TokenBatch, Cancel, LevelCall, LevelReply, Commit,
                                           StateQuery, RequestState, StoredLogprobs, Outcome, StepProfile,
                                           Assignments, ExplainQuery, Explanation)}


# -- codec ------------------------------------------------------------------------------
_SCALARS = (int, float, str, bytes, bool, type(None))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        if all(type(v) in _SCALARS for v in value):  # token ids, log-probabilities: as they are
            return value
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def encode(message: Any) -> bytes:
    """msgpack bytes of a message dataclass, tagged with its type and the wire version."""
    body = _plain(message)
    body["v"] = V
    body["type"] = type(message).TYPE
    return msgpack.packb(body, use_bin_type=True)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _check(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, where)
            except BadMessage as exc:
                errors.append(str(exc))
        raise BadMessage(errors[0] if errors else f"{where}: unexpected null")
    if origin is list:
        if not isinstance(value, list):
            raise BadMessage(f"{where}: expected a list, got {type(value).__name__}")
        if not args:
            return value
        if args[0] is int and all(type(v) is int for v in value):  # the common case, checked at C speed
            return value
        if args[0] is float and all(type(v) is float for v in value):
            return value
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BadMessage(f"{where}: expected a map, got {type(value).__name__}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise BadMessage(f"{where}: expected a map, got {type(value).__name__}")
        return _build(hint, value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadMessage(f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadMessage(f"{where}: expected an integer, got {type(value).__name__}")
        return value
    if hint in (str, bytes, bool):
        if not isinstance(value, hint):
            raise BadMessage(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _check(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BadMessage(f"{where}: missing field {f.name!r}")
    return cls(**kwargs)  # unknown fields (from newer minor versions) are ignored


def decode(data: bytes, expected: type | None = None) -> Any:
    """The message in `data`; BadMessage if it is not one (of type `expected`, when given)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise BadMessage(f"not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise BadMessage(f"expected a map, got {type(body).__name__}")
    version = body.pop("v", None)
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadMessage("missing wire version 'v'")
    if version > V:
        raise BadMessage(f"wire version {version} is newer than this service's {V}")
    kind = body.pop("type", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise BadMessage(f"unknown message type {kind!r}")
    if expected is not None and cls is not expected:
        raise BadMessage(f"expected a {expected.TYPE!r} message, got {kind!r}")
    return _build(cls, body, cls.__name__)
