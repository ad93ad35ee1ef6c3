"""One request, API-neutral: validate it into a `GenerateJob`, then turn the backend's token
batches into text (incremental, UTF-8-safe), cut at `stop` strings, with usage, timings and
the request's speculation statistics. The HTTP and gRPC APIs both go through here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.gateway.backend import GenerationError
from services.gateway.generation_defaults import GenerationDefaults
from shared.messages import MAX_TOP_LOGPROBS, Assignment, GenerateJob, Sampling, TokenLogprob
from shared.request_class import classify
from shared.settings import Settings
from shared.tracing import Status, StatusCode, tracer, use_span

log = logging.getLogger("specmesh.gateway")
requests_log = logging.getLogger("specmesh.gateway.requests")  # gateway.log_requests' lines

# Limits a request is checked against (the OpenAI API's where it has one).
TEMPERATURE_MAX = 2.0
MAX_STOP_STRINGS = 64  # OpenAI takes 4, vLLM any number: evaluation harnesses send more than 4
MAX_STOP_CHARS = 1024  # characters of one stop string (the stream holds back up to the longest)
MAX_STOP_TOKEN_IDS = 64
MAX_CACHE_SALT = 256  # characters of a cache_salt
PRIORITY_MAX = 2**31 - 1  # |priority| (an int32 in gRPC)
MAX_K = 16  # the same bound as settings.speculation.k
SLO_MAX_MS = 60_000.0  # a TPOT objective above a minute per token is a typo
SEED_MAX = 2**63 - 1
PENALTY_MAX = 2.0  # presence_penalty and frequency_penalty, in [-2, 2]
REPETITION_MAX = 2.0  # repetition_penalty in (0, 2], as vLLM
BIAS_MAX = 100.0  # a logit_bias value, in [-100, 100]
MAX_LOGIT_BIAS = 1024  # entries in logit_bias
TARGET_ONLY = ["target"]
REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # safe inside a NATS subject

class ApiError(Exception):
    """An error reply with a message a user can act on, in the OpenAI error vocabulary.

    `status` is the HTTP status; the gRPC API maps it to a status code (grpc_server.py).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def overloaded(limit: int) -> ApiError:
    error = ApiError(429, f"This gateway is running its limit of {limit} generations; retry shortly "
                          f"(gateway.max_concurrent_requests).", type="rate_limit_error", code="too_many_requests")
    error.headers = {"retry-after": "1"}
    return error


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="service_unavailable", code="service_unavailable")


# -- the request ------------------------------------------------------------------------
@dataclass
class SpeculationRequest:
    """The `speculation` extension: None everywhere means the gateway's defaults."""

    chain: str | list[str] | None = None  # "drafter,target" or ["drafter", "target"]
    k: int | list[int] | None = None  # one value for every proposing level, or one per level
    enabled: bool | None = None  # False: target only
    confidence_threshold: float | None = None
    slo_tpot_ms: float | None = None  # this request's TPOT objective: never explored on a chain predicted to miss it


@dataclass
class GenerationRequest:
    """What either API asks for, before validation."""

    request_id: str
    prompt: str | list[int]  # text, or token ids
    max_tokens: int | None  # None: `default_max_tokens`, shortened to fit the context
    default_max_tokens: int = 16
    temperature: float | None = None  # None: 1.0, as in the OpenAI API
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None  # None: 0 (off)
    seed: int | None = None
    presence_penalty: float | None = None  # None: 0
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # None: 1 (off)
    logit_bias: dict[str | int, float] | None = None  # token id (text in JSON, an int in gRPC) -> bias
    min_tokens: int | None = None  # no end of sequence (nor stop token) before this many tokens (None: 0)
    stop_token_ids: list[int] | None = None  # tokens that end the output (not in its text), as vLLM's
    ignore_eos: bool | None = None  # True: generate past the end-of-sequence token, up to max_tokens
    response_format: str | None = None  # "json_object" / "json_schema": one JSON object (of `json_schema`); None: text
    json_schema: str | None = None  # with "json_schema": the schema as JSON text
    regex: str | None = None  # with "regex": the expression the whole output matches
    tool_calls: bool = False  # the schema is a list of tool calls (tools.py), not response_format's object
    stop: str | list[str] | None = None
    speculation: SpeculationRequest | None = None
    prompt_param: str = "prompt"  # where the prompt came from, for error messages
    logprobs: int = -1  # -1: none; n >= 0: each token's log-probability and the n likeliest (validated by the API)
    echo: bool = False  # the prompt's tokens too (with `logprobs`, theirs); max_tokens may then be 0
    cache_salt: str | None = None  # prefix caching: heads cached for one salt are reused only by that salt
    truncate_prompt_tokens: int | None = None  # keep the prompt's last n tokens (vLLM's); None: all of it
    priority: int | None = None  # lower is admitted first where a target has a queue (vLLM's); None: 0
    allowed_token_ids: list[int] | None = None  # only these may be sampled (vLLM's); None: every token
    prompt_logprobs: int = -1  # vLLM's: each prompt token's log-probability and the n likeliest (-1: none)


def plan(backend, settings: Settings, req: GenerationRequest) -> tuple[GenerateJob, list[str]]:
    """The job to send and the stop strings to apply; ApiError (4xx) if the request cannot run."""
    tok = backend.tokenizer()
    defaults = getattr(backend, "generation_defaults", None) or NO_DEFAULTS
    prompt = _truncated(_prompt_ids(tok, req.prompt, req.prompt_param), req.truncate_prompt_tokens)
    context = backend.max_context
    if len(prompt) >= context:
        raise invalid(f"The prompt is {len(prompt)} tokens long, but this model's context is {context} tokens "
                      f"(prompt + max_tokens); shorten the prompt.", req.prompt_param, "context_length_exceeded")
    room = context - len(prompt)
    if req.max_tokens is None:
        max_tokens = min(defaults.max_new_tokens or req.default_max_tokens, room)
    else:
        max_tokens = _int(req.max_tokens, "max_tokens")
        if max_tokens == 0 and req.echo:  # the prompt only: one token is generated and left out of the answer
            max_tokens = 1
        if max_tokens < 1:
            raise invalid(f"max_tokens must be at least 1 (0 only with echo), got {max_tokens}.", "max_tokens")
        if max_tokens > room:
            raise invalid(f"max_tokens={max_tokens} plus the prompt's {len(prompt)} tokens exceeds this model's "
                          f"context of {context} tokens; ask for at most {room}.", "max_tokens",
                          "context_length_exceeded")
    sampling = Sampling(
        temperature=_ranged(req.temperature, _or(defaults.temperature, 1.0), "temperature", 0.0, TEMPERATURE_MAX,
                            "between 0 and 2"),
        top_p=_ranged(req.top_p, _or(defaults.top_p, 1.0), "top_p", 0.0, 1.0, "greater than 0 and at most 1",
                      open_low=True),
        top_k=_top_k(req.top_k if req.top_k is not None else defaults.top_k, len(tok)),
        min_p=_ranged(req.min_p, _or(defaults.min_p, 0.0), "min_p", 0.0, 1.0, "between 0 and 1 (0 is off)"),
        seed=_seed(req.seed),
        presence_penalty=_ranged(req.presence_penalty, 0.0, "presence_penalty", -PENALTY_MAX, PENALTY_MAX,
                                 f"between -{PENALTY_MAX:g} and {PENALTY_MAX:g}"),
        frequency_penalty=_ranged(req.frequency_penalty, 0.0, "frequency_penalty", -PENALTY_MAX, PENALTY_MAX,
                                  f"between -{PENALTY_MAX:g} and {PENALTY_MAX:g}"),
        repetition_penalty=_ranged(req.repetition_penalty, _or(defaults.repetition_penalty, 1.0), "repetition_penalty", 0.0, REPETITION_MAX,
                                   f"greater than 0 and at most {REPETITION_MAX:g} (1 is off)", open_low=True),
        **_logit_bias(req.logit_bias, len(tok)),
        min_tokens=_min_tokens(req.min_tokens, max_tokens),
        stop_token_ids=_stop_token_ids(req.stop_token_ids, len(tok)),
        allowed_token_ids=_allowed_token_ids(req.allowed_token_ids, len(tok)),
        **_response_format(req, tok),
        cache_salt=_cache_salt(req.cache_salt),
    )
    text = req.prompt if isinstance(req.prompt, str) and req.truncate_prompt_tokens is None else tok.decode(prompt)
    request_class = classify(text, len(prompt))
    lookup = getattr(backend, "assignment", None)
    with getattr(backend, "tracer", tracer(None)).start_as_current_span("router.assignment") as span:
        assigned = lookup(request_class) if lookup else None
        if span.is_recording():
            table = getattr(backend, "table", None)
            span.set_attributes({"specmesh.request_class": request_class,
                                 "specmesh.router.version": getattr(table, "version", -1),
                                 "specmesh.chain": ",".join(assigned.chain) if assigned else "",
                                 "specmesh.k": list(assigned.k) if assigned else [],
                                 "specmesh.router.reason": getattr(assigned, "reason", "") or ""})
    if not -1 <= req.prompt_logprobs <= MAX_TOP_LOGPROBS:
        raise invalid(f"prompt_logprobs must be 0..{MAX_TOP_LOGPROBS} (how many alternatives per prompt token), got "
                      f"{req.prompt_logprobs}.", "prompt_logprobs")
    if not -1 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise invalid(f"logprobs must be 0..{MAX_TOP_LOGPROBS} (how many alternatives per token), got {req.logprobs}.",
                      "logprobs")
    spec = req.speculation or SpeculationRequest()
    slo = _ranged(spec.slo_tpot_ms, 0.0, "speculation.slo_tpot_ms", 0.0, SLO_MAX_MS,
                  f"a number of milliseconds above 0 and at most {SLO_MAX_MS:g}", open_low=True)
    chain, k, threshold = resolve_speculation(spec, backend.chains(), settings, for_slo(assigned, slo))
    job = GenerateJob(request_id=req.request_id, prompt=prompt, max_tokens=max_tokens, sampling=sampling,
                      chain=chain, k=k, confidence_threshold=threshold, request_class=request_class, slo_tpot_ms=slo,
                      stop_at_eos=not _bool(req.ignore_eos, "ignore_eos"),
                      logprobs=req.logprobs, prompt_logprobs=max(req.logprobs if req.echo else -1, req.prompt_logprobs),
                      priority=_priority(req.priority), adaptive_depth=spec.k is None)
    stops = _stops(req.stop)
    limit = settings.gateway.max_concurrent_requests
    if len(getattr(backend, "in_flight", ())) >= limit:
        raise overloaded(limit)
    if (admit := getattr(backend, "admit", None)) is not None:
        admit(job.request_id)  # in flight from its assignment (no await since) until its generation ends
    return job, stops


NO_DEFAULTS = GenerationDefaults()


def _or(value, default):
    return default if value is None else value


def _prompt_ids(tok, prompt: str | list[int], param: str) -> list[int]:
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise invalid(f"The prompt is not valid Unicode ({exc.reason} at character {exc.start}).", param) from None
        ids = list(tok.encode(prompt))
    else:
        vocab = len(tok)
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise invalid(f"Prompt token ids must be integers in [0, {vocab}); got {bad[0]!r}.", param)
        ids = list(prompt)
    if not ids:  # an empty prompt starts from the beginning-of-sequence token
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise invalid("The prompt is empty.", param)
        ids = [bos]
    return ids


def _priority(value: int | None) -> int:
    if value is None:
        return 0
    value = _int(value, "priority")
    if not -PRIORITY_MAX <= value <= PRIORITY_MAX:
        raise invalid(f"priority must be an integer between -{PRIORITY_MAX} and {PRIORITY_MAX} (lower runs first), "
                      f"got {value}.", "priority")
    return value


def _truncated(prompt: list[int], keep: int | None) -> list[int]:
    """The prompt's last `keep` tokens (vLLM's truncate_prompt_tokens); the whole one for None."""
    if keep is None:
        return prompt
    keep = _int(keep, "truncate_prompt_tokens")
    if keep < 1:
        raise invalid(f"truncate_prompt_tokens must be at least 1 (the prompt's last tokens to keep), got {keep}.",
                      "truncate_prompt_tokens")
    return prompt[-keep:]


def _int(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{param} must be an integer, got {value!r}.", param)
    return value


def _ranged(value: float | None, default: float, param: str, low: float, high: float, words: str,
            open_low: bool = False) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{param} must be a number {words}, got {value!r}.", param)
    ok = (low < value <= high) if open_low else (low <= value <= high)  # False for NaN
    if not ok:
        raise invalid(f"{param} must be {words}, got {value}.", param)
    return float(value)


def _top_k(value: int | None, vocab: int) -> int:
    if value is None:
        return 0
    value = _int(value, "top_k")
    if value < 0:
        raise invalid(f"top_k must be 0 (off) or a positive number of tokens, got {value}.", "top_k")
    return min(value, vocab)


def _logit_bias(value: dict[str | int, float] | None, vocab: int) -> dict[str, list]:
    """`Sampling`'s two logit-bias lists from a map of token ids (text as JSON keys are, or ints) to biases."""
    ids: list[int] = []
    biases: list[float] = []
    if value is None:
        return {"logit_bias_ids": ids, "logit_bias_values": biases}
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise invalid(f"logit_bias must be an object mapping at most {MAX_LOGIT_BIAS} token ids to biases, got "
                      f"{f'{len(value)} entries' if isinstance(value, dict) else repr(value)[:40]}.", "logit_bias")
    seen: set[int] = set()
    for key, bias in value.items():
        digits = isinstance(key, str) and key.strip().isascii() and key.strip().isdigit()
        token = int(key) if digits else key if isinstance(key, int) else None
        if isinstance(token, bool) or token is None or not 0 <= token < vocab:
            raise invalid(f"logit_bias keys must be token ids in [0, {vocab}), got {key!r}.", "logit_bias")
        if token in seen:
            raise invalid(f"logit_bias names token {token} more than once.", "logit_bias")
        seen.add(token)
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -BIAS_MAX <= bias <= BIAS_MAX:
            raise invalid(f"logit_bias[{key!r}] must be a number between -{BIAS_MAX:g} and {BIAS_MAX:g}, got {bias!r}.",
                          "logit_bias")
        ids.append(token)
        biases.append(float(bias))
    return {"logit_bias_ids": ids, "logit_bias_values": biases}


def _response_format(req: GenerationRequest, tok) -> dict:
    """The job's `Sampling.response_format` and `json_schema`, checked (the schema compiled)
    and against what they cannot go with."""
    fmt, schema, regex = req.response_format or "", req.json_schema or "", req.regex or ""
    if fmt == "text":
        fmt = ""
    if fmt not in ("", "json_object", "json_schema", "regex"):
        raise invalid(f"response_format must be 'text', 'json_object', 'json_schema' or 'regex', got {fmt!r}.",
                      "response_format")
    if schema and fmt != "json_schema":
        raise invalid("json_schema is only taken with response_format 'json_schema'.", "json_schema")
    if regex and fmt != "regex":
        raise invalid("regex is only taken with response_format 'regex'.", "regex")
    if fmt == "regex":
        from shared.engine.regex import compile_regex

        try:
            compile_regex(regex)
        except ValueError as exc:
            raise invalid(f"guided_regex: {exc}.", "guided_regex") from None
    if fmt == "json_schema":
        from shared.engine.json_schema import compile_schema

        try:
            automaton = compile_schema(schema)
        except ValueError as exc:
            raise invalid(f"response_format json_schema: {exc}.", "response_format") from None
        if automaton.root_kind != "object" and not req.tool_calls:  # tool calls are a list (tools.py)
            raise invalid("response_format json_schema: the schema's root must be an object (type: object), as "
                          "OpenAI's structured outputs ask.", "response_format")
    if fmt and req.min_tokens:
        raise invalid(f"min_tokens cannot be combined with response_format {fmt}: the end of sequence must be "
                      f"free to follow the object.", "min_tokens")
    if fmt and req.ignore_eos:
        raise invalid(f"ignore_eos cannot be combined with response_format {fmt}: nothing may follow the object "
                      f"but the end of sequence.", "ignore_eos")
    if fmt and req.allowed_token_ids:
        raise invalid(f"allowed_token_ids cannot be combined with response_format {fmt}: the format decides which "
                      f"tokens may come.", "allowed_token_ids")
    if fmt and tok.eos_token_id is None:
        raise invalid(f"response_format {fmt} needs a model with an end-of-sequence token.", "response_format")
    return {"response_format": fmt, "json_schema": schema, "regex": regex}


def _min_tokens(value: int | None, max_tokens: int) -> int:
    if value is None:
        return 0
    value = _int(value, "min_tokens")
    if not 0 <= value <= max_tokens:
        raise invalid(f"min_tokens must be between 0 and max_tokens ({max_tokens}), got {value}.", "min_tokens")
    return value


def _stop_token_ids(value: list[int] | None, vocab: int) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_STOP_TOKEN_IDS:
        raise invalid(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids, got "
                      f"{len(value) if isinstance(value, list) else repr(value)[:40]}.", "stop_token_ids")
    bad = [t for t in value if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise invalid(f"stop_token_ids must be token ids in [0, {vocab}), got {bad[0]!r}.", "stop_token_ids")
    return sorted(set(value))


def _allowed_token_ids(value: list[int] | None, vocab: int) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list) or not value:
        raise invalid(f"allowed_token_ids must be a non-empty list of token ids, got {repr(value)[:40]}.",
                      "allowed_token_ids")
    bad = [t for t in value if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise invalid(f"allowed_token_ids must be token ids in [0, {vocab}), got {bad[0]!r}.", "allowed_token_ids")
    return sorted(set(value))


def _cache_salt(value: str | None) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_CACHE_SALT:
        raise invalid(f"cache_salt must be a string of 1 to {MAX_CACHE_SALT} characters, got {repr(value)[:40]}.",
                      "cache_salt")
    return value


def _bool(value: bool | None, param: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"{param} must be true or false, got {value!r}.", param)
    return value


def _seed(value: int | None) -> int | None:
    if value is None:
        return None
    value = _int(value, "seed")
    if not 0 <= value <= SEED_MAX:
        raise invalid(f"seed must be between 0 and {SEED_MAX}, got {value}.", "seed")
    return value


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"At most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}.", "stop")
    if any(not isinstance(s, str) or not s for s in stops):
        raise invalid("Stop strings must be non-empty strings.", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise invalid(f"A stop string may hold at most {MAX_STOP_CHARS} characters.", "stop")
    return stops


def for_slo(assigned, slo_tpot_ms: float):
    """The router's assignment for a request with its own TPOT objective.

    The assignment stands when it is the router's cost choice and predicted to meet the
    objective. Otherwise (an exploration, or predicted slower) the cheapest of the table's
    alternatives predicted to meet it is taken, reason `slo`; when none is, the cheapest
    (`slo-unmet`): a request that states an objective is never the one a trial is run on.
    Under load (reason `shared`) the table lists the one chain every class rides as the only
    alternative, so such a request stays on it rather than slow every round it joins.
    """
    if not slo_tpot_ms or assigned is None or not getattr(assigned, "alternatives", None):
        return assigned
    predicted = assigned.predicted_ms_per_token
    if assigned.reason != "explore" and predicted is not None and predicted <= slo_tpot_ms:
        return assigned
    meets = [c for c in assigned.alternatives if c.predicted_ms_per_token <= slo_tpot_ms]
    pick = meets[0] if meets else assigned.alternatives[0]
    return Assignment(assigned.request_class, list(pick.chain), list(pick.k), pick.predicted_ms_per_token,
                      "slo" if meets else "slo-unmet", list(assigned.alternatives))


def resolve_speculation(spec: SpeculationRequest | None, chains: list[list[str]],
                        settings: Settings, assigned=None) -> tuple[list[str], list[int], float]:
    """Chain (bottom first), k per proposing level and confidence threshold for one request.

    No chain in `speculation` means the router's assignment for the request's class
    (`assigned`, when the backend serves its chain), else the settings' default chain when
    served, else target only; `enabled: false` means target only, whatever else is given.
    """
    spec = spec or SpeculationRequest()
    served = [list(c) for c in chains]
    defaults = settings.speculation
    if spec.enabled is False:
        chain = list(TARGET_ONLY)
    elif spec.chain is not None:
        chain = _chain(spec.chain)
        if chain not in served:
            names = ", ".join(repr(",".join(c)) for c in served) or "none"
            raise invalid(f"speculation.chain {','.join(chain)!r} is not served; choose one of: {names}.",
                          "speculation.chain", "unknown_chain")
    elif assigned is not None and list(assigned.chain) in served:
        chain = list(assigned.chain)
    else:
        default = _chain(defaults.chain)
        chain = default if default in served else list(TARGET_ONLY)
    levels = len(chain) - 1
    if spec.k is None and spec.chain is None and assigned is not None and chain == list(assigned.chain) \
            and len(assigned.k) == levels:
        k = list(assigned.k)
    elif spec.enabled is False or spec.k is None:
        k = [defaults.k] * levels
    else:
        given = [spec.k] if isinstance(spec.k, int) else list(spec.k)
        if len(given) == 1:
            given = given * levels
        if len(given) != levels:
            raise invalid(f"speculation.k has {len(given)} values, but chain {','.join(chain)!r} has {levels} "
                          f"proposing levels; give one value or one per level.", "speculation.k")
        for value in given:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_K:
                raise invalid(f"speculation.k values must be integers in [0, {MAX_K}], got {value!r}.",
                              "speculation.k")
        k = given
    threshold = _ranged(spec.confidence_threshold, defaults.confidence_threshold,
                        "speculation.confidence_threshold", 0.0, 1.0, "between 0 and 1")
    return chain, k, threshold


def _chain(chain: str | list[str]) -> list[str]:
    names = chain.split(",") if isinstance(chain, str) else list(chain)
    names = [n.strip() for n in names if isinstance(n, str)]
    if not names or any(not n for n in names):
        raise invalid(f"speculation.chain must name models bottom level first, e.g. 'drafter,target'; got {chain!r}.",
                      "speculation.chain")
    return names


# -- text out ---------------------------------------------------------------------------
class Detokenizer:
    """Token ids in, text out as soon as it is complete: never half a UTF-8 character.

    The text of the ids since `prefix` is decoded whole and compared with the text before
    `read` (TGI's and vLLM's scheme), so tokens that only make sense together (bytes of
    one character, SentencePiece spaces) come out right.
    """

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        context = list(context)[-5:]
        if self._decode(context).endswith("\ufffd"):
            context = []  # a prompt that ends mid-character is no help
        self.ids = context
        self.prefix = 0
        self.read = len(context)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def push(self, token: int) -> str:
        """The new text `token` completes ('' while a character is unfinished)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end, unfinished characters as U+FFFD."""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):] if len(text) > len(before) else ""


class StopMatcher:
    """Cuts the text before the first stop string (after it with `include`, vLLM's
    `include_stop_str_in_output`); holds back a tail that may begin one."""

    def __init__(self, stops: Sequence[str], include: bool = False):
        self.stops = list(stops)
        self.include = include
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0
        self.hit: str | None = None  # the stop string that ended the text

    def push(self, delta: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string was hit)."""
        self.text += delta
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, False
        # A stop string cannot begin in released text: any tail that could begin one was held.
        hits = [(i, -len(s)) for i, s in ((self.text.find(s, self.sent), s) for s in self.stops) if i >= 0]
        if hits:
            at, minus_length = min(hits)  # the first stop string in the text (the longest of those starting there)
            self.hit = self.text[at:at - minus_length]
            end = at - minus_length if self.include else at
            out, self.sent = self.text[self.sent:end], end
            self.text = self.text[:end]
            return out, True
        hold = 0
        for h in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-h:]
            if any(s.startswith(tail) for s in self.stops):
                hold = h
                break
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], end
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def speculation_report(job: GenerateJob, stats: dict[str, Any]) -> dict:
    """Per-request speculation stats from the target's last `TokenBatch.stats`.

    Expected shape (cumulative for the request): `{"chain": [...], "k": [...], "levels":
    [{"name", "drafted", "accepted", "accepted_per_pos"}, ...]}` (LevelStats' names); a map
    `{level_name: {...}}` is read too. Anything malformed is skipped, never an error.
    """
    raw = stats.get("levels") if isinstance(stats, dict) else None
    if not isinstance(raw, list) and isinstance(stats, dict):
        raw = [{"name": name, **v} for name, v in stats.items() if isinstance(v, dict)]
    levels = []
    for lv in raw or []:
        if not isinstance(lv, dict):
            continue
        drafted, accepted = _count(lv.get("drafted")), _count(lv.get("accepted"))
        per_pos = lv.get("accepted_per_pos", lv.get("accepted_per_position", []))
        levels.append({
            "name": str(lv.get("name", "")),
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": round(accepted / drafted, 6) if drafted else None,
            "accepted_per_position": [_count(x) for x in per_pos] if isinstance(per_pos, list) else [],
            "expected_acceptance": _fraction(lv.get("expected_acceptance")),
        })
    chain = stats.get("chain") if isinstance(stats, dict) else None  # the chain may shrink mid-request
    k = stats.get("k") if isinstance(stats, dict) else None
    return {
        "chain": [str(c) for c in chain] if isinstance(chain, list) else list(job.chain),
        "k": [_count(x) for x in k] if isinstance(k, list) else list(job.k),
        "levels": levels,
        "slo_tpot_ms": job.slo_tpot_ms or None,
        "slo_met": None,  # set once the timings are known
    }


def _misaligned(what: str) -> ApiError:
    return ApiError(500, f"The backend sent {what} (a worker older than this gateway?).", type="server_error",
                    code="generation_failed")


def _fraction(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1
    return round(float(value), 6) if ok else None


def _count(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else 0


@dataclass
class Delta:
    """New output: text (may be '' while a character or a possible stop string is unfinished) and token ids."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id when the job asked


@dataclass
class Outcome:
    """A finished generation."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id when the job asked
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # the prompt's tokens after the first (echo)
    finish_reason: str = "stop"  # "stop" | "length"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it (vLLM's); None: EOS, length
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's, those the target's prefix cache already held
    speculation: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @property
    def usage(self) -> dict:
        n = len(self.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n,
                "cached_prompt_tokens": self.cached_tokens}


_cleanups: set[asyncio.Task] = set()  # cancels in flight, kept alive past a cancelled request


class Generation:
    """One running request: `async for delta in gen.deltas()`, then `gen.outcome`; or `await gen.run()`.

    Ends the backend's generation (`backend.cancel`) whenever it stops early: a stop
    string, the timeout, an error, or the consumer going away (client disconnect).
    """

    def __init__(self, backend, job: GenerateJob, stops: Sequence[str], *, timeout_s: float,
                 started: float | None = None, operation: str = "text_completion", include_stop: bool = False,
                 log_prompt: int | None = None):
        self.backend, self.job = backend, job
        self.log_prompt = log_prompt  # None: no request lines; else their prompt text, cut to this many characters
        self.operation = operation  # gen_ai.operation.name of the request's span
        self.span = None  # the request's span, open while `deltas` runs
        self.started = started if started is not None else time.monotonic()
        self.deadline = self.started + timeout_s
        self.timeout_s = timeout_s
        self.detok = Detokenizer(backend.tokenizer(), job.prompt)
        self.stops = StopMatcher(stops, include_stop)
        self.outcome = Outcome(prompt_tokens=len(job.prompt))
        self._text: list[str] = []
        self._stats: dict = {}
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None

    async def run(self) -> Outcome:
        async for _ in self.deltas():
            pass
        return self.outcome

    async def deltas(self) -> AsyncIterator[Delta]:
        self.span = self._open_span()
        if self.log_prompt is not None:
            self._log_received()
        batches = self.backend.generate(self.job)
        backend_done = False
        try:
            while True:
                batch = await self._next(batches)
                if batch is None:
                    raise unavailable("The backend ended the generation without finishing it; retry the request.")
                backend_done = batch.finished
                delta, stopped = self._take(batch)
                if delta.text or delta.token_ids:
                    yield delta
                if stopped or batch.finished:
                    self._finish(batch, stopped)
                    tail = self.stops.flush() if not stopped else ""
                    if tail:
                        self._text.append(tail)
                        yield Delta(tail, [])
                    self.outcome.text = "".join(self._text)
                    return
        except BaseException as exc:
            self._failed(exc)
            raise
        finally:
            await self._close(batches, cancel=not backend_done)
            self.span.end()

    async def _next(self, batches):
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            with use_span(self.span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                return await asyncio.wait_for(anext(batches, None), remaining)  # the backend's NATS work in our span
        except asyncio.TimeoutError:
            raise ApiError(504, f"The generation did not finish within the gateway's {self.timeout_s:g} s timeout; "
                                f"ask for fewer tokens or retry later.", type="timeout", code="timeout") from None
        except GenerationError as exc:
            status = getattr(exc, "status", 503)
            raise ApiError(status, str(exc) or "The backend failed to generate; retry the request.",
                           type="service_unavailable" if status == 503 else "server_error",
                           code="backend_error") from None
        except (ConnectionError, OSError) as exc:
            raise unavailable(f"The backend is unreachable ({exc}); retry shortly.") from None

    def _take(self, batch) -> tuple[Delta, bool]:
        """The part of `batch` not seen yet, detokenized and matched against the stop strings."""
        if batch.error or batch.finish_reason in ("error", "cancelled"):
            why = batch.error or f"the generation was {batch.finish_reason} by the backend"
            raise ApiError(500 if batch.finish_reason == "error" or batch.error else 503,
                           f"Generation failed: {why}.", type="server_error", code="generation_failed")
        if batch.stats:
            self._stats = batch.stats
        have = len(self.outcome.token_ids)
        skip = max(0, have - batch.position)
        tokens = list(batch.tokens[skip:])  # a resumed request may resend a batch
        logprobs = list(batch.logprobs[skip:])
        if self.job.logprobs >= 0 and len(batch.logprobs) != len(batch.tokens):
            raise _misaligned(f"{len(batch.tokens)} tokens with {len(batch.logprobs)} log-probabilities")
        if self.job.prompt_logprobs >= 0 and batch.position == 0 and not self.outcome.prompt_logprobs:
            if len(batch.prompt_logprobs) != len(self.job.prompt) - 1:
                raise _misaligned(f"{len(batch.prompt_logprobs)} log-probabilities for a prompt of "
                                  f"{len(self.job.prompt)} tokens")
            self.outcome.prompt_logprobs = list(batch.prompt_logprobs)
        if batch.position > have:
            log.warning("request %s: batch at %d after %d tokens (gap)", self.job.request_id, batch.position, have)
        now = time.monotonic()
        if tokens:
            self._first_token_at = self._first_token_at or now
            self._last_token_at = now
        text, taken, stopped = [], [], False
        for j, token in enumerate(tokens):
            taken.append(token)
            if batch.finished and j == len(tokens) - 1 and token in self.job.sampling.stop_token_ids:
                self.outcome.stop_reason = token
                break  # a stop token ends the output and is not part of its text
            released, stopped = self.stops.push(self.detok.push(token))
            text.append(released)
            if stopped:
                break
        if not stopped and batch.finished:
            released, stopped = self.stops.push(self.detok.flush())
            text.append(released)
        if stopped:
            self.outcome.stop_reason = self.stops.hit
        self.outcome.token_ids.extend(taken)
        taken_logprobs = logprobs[:len(taken)] if self.job.logprobs >= 0 else []
        self.outcome.logprobs.extend(taken_logprobs)
        delta = Delta("".join(text), taken, taken_logprobs)
        self._text.append(delta.text)
        return delta, stopped

    def _finish(self, batch, stopped: bool) -> None:
        out = self.outcome
        out.finish_reason = "stop" if stopped or batch.finish_reason != "length" else "length"
        out.speculation = speculation_report(self.job, self._stats)
        cached = self._stats.get("cached_prompt_tokens") if isinstance(self._stats, dict) else None
        out.cached_tokens = max(0, min(_count(cached), out.prompt_tokens))
        end = time.monotonic()
        n = len(out.token_ids)
        first, last = self._first_token_at, self._last_token_at
        out.timings = {
            "first_token_ms": round((first - self.started) * 1e3, 3) if first else None,
            "total_ms": round((end - self.started) * 1e3, 3),
            "inter_token_ms": round((last - first) * 1e3 / (n - 1), 3) if first and n > 1 else None,
            "tokens_per_s": round(n / (end - self.started), 3) if end > self.started else None,
        }
        if self.job.slo_tpot_ms:
            gap = out.timings["inter_token_ms"]
            out.speculation["slo_met"] = gap is None or gap <= self.job.slo_tpot_ms
        self._observe(out)

    # -- observability ------------------------------------------------------------------
    def _open_span(self):
        """The request's span (GenAI semantic conventions plus `specmesh.*`), under the API's server span."""
        job, s = self.job, self.job.sampling
        model = getattr(self.backend, "model_name", "specmesh")
        attributes = {
            "gen_ai.operation.name": self.operation, "gen_ai.provider.name": "specmesh", "gen_ai.system": "specmesh",
            "gen_ai.request.model": model, "gen_ai.request.max_tokens": job.max_tokens,
            "gen_ai.request.temperature": s.temperature, "gen_ai.request.top_p": s.top_p,
            "gen_ai.request.top_k": s.top_k, "gen_ai.usage.input_tokens": len(job.prompt),
            "gen_ai.response.id": job.request_id, "gen_ai.response.model": model,
            "specmesh.request_id": job.request_id, "specmesh.chain": ",".join(job.chain), "specmesh.k": list(job.k),
            "specmesh.request_class": job.request_class,
        }
        if s.seed is not None:
            attributes["gen_ai.request.seed"] = s.seed
        return getattr(self.backend, "tracer", tracer(None)).start_span(f"{self.operation} {model}", attributes=attributes)

    def _observe(self, out: Outcome) -> None:
        """A finished request: usage and speculation on its span, latencies in the metrics."""
        levels = out.speculation.get("levels", [])
        if self.span is not None and self.span.is_recording():
            self.span.set_attributes({
                "gen_ai.usage.output_tokens": len(out.token_ids), "gen_ai.response.finish_reasons": [out.finish_reason],
                "specmesh.chain": ",".join(out.speculation.get("chain", [])),
                "specmesh.levels": [lv["name"] for lv in levels],
                "specmesh.drafted": [lv["drafted"] for lv in levels],
                "specmesh.accepted": [lv["accepted"] for lv in levels],
                "specmesh.first_token_ms": out.timings.get("first_token_ms") or 0.0,
            })
        metrics = getattr(self.backend, "metrics", None)
        if metrics is not None:
            metrics.finished(out.timings, out.prompt_tokens, len(out.token_ids), out.finish_reason)
        if self.log_prompt is not None:
            t = out.timings
            accepted = ", ".join(f"{lv['name']} {lv['accepted']}/{lv['drafted']}" for lv in levels) or "none"
            requests_log.info("request %s finished: %s, %d tokens, chain %s (accepted/drafted: %s), TTFT %s ms, "
                              "TPOT %s ms, %d cached prompt tokens", self.job.request_id, out.finish_reason,
                              len(out.token_ids), ",".join(out.speculation.get("chain", [])), accepted,
                              t.get("first_token_ms"), t.get("inter_token_ms"), out.cached_tokens)

    def _log_received(self) -> None:
        """vLLM's request line: what was asked, and (`log_prompt` characters of) the prompt."""
        job, s = self.job, self.job.sampling
        sampling = f"temperature={s.temperature:g} top_p={s.top_p:g} top_k={s.top_k} min_p={s.min_p:g}" + \
            (f" seed={s.seed}" if s.seed is not None else "")
        text = ""
        if self.log_prompt:
            decoded = self.backend.tokenizer().decode(job.prompt)
            text = f", prompt {decoded[:self.log_prompt]!r}" + ("..." if len(decoded) > self.log_prompt else "")
        requests_log.info("request %s received: %d prompt tokens, max_tokens %d, chain %s, k %s, %s, priority %d%s",
                          job.request_id, len(job.prompt), job.max_tokens, ",".join(job.chain), list(job.k), sampling,
                          job.priority, text)

    def _failed(self, exc: BaseException) -> None:
        """The request ended without finishing: its span says why; an error is counted."""
        if self.log_prompt is not None:
            why = "cancelled" if isinstance(exc, (GeneratorExit, asyncio.CancelledError)) else \
                f"{exc.status} {exc.message}" if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"
            requests_log.info("request %s ended unfinished after %d tokens: %s", self.job.request_id,
                              len(self.outcome.token_ids), why)
        if isinstance(exc, ApiError):
            self.span.set_status(Status(StatusCode.ERROR, exc.message))
            self.span.set_attribute("error.type", exc.code or exc.type)
        elif isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
            self.span.set_attribute("specmesh.cancelled", True)
            return
        else:
            self.span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        metrics = getattr(self.backend, "metrics", None)
        if metrics is not None:
            metrics.requests.labels("error").inc()

    async def _close(self, batches, cancel: bool) -> None:
        """Close the backend's stream and, if it is still generating, cancel it; survives our own cancellation."""

        async def close() -> None:
            try:
                aclose = getattr(batches, "aclose", None)
                if aclose is not None:
                    await aclose()
            except Exception:  # a backend's cleanup must not hide the request's outcome
                log.exception("request %s: closing the backend stream failed", self.job.request_id)
            if cancel:
                try:
                    await self.backend.cancel(self.job.request_id)
                except Exception:
                    log.exception("request %s: cancel failed", self.job.request_id)

        task = asyncio.get_running_loop().create_task(close())
        _cleanups.add(task)
        task.add_done_callback(_cleanups.discard)
        await asyncio.shield(task)
