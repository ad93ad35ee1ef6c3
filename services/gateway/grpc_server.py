"""The gateway's gRPC API (proto/specmesh/v1/generate.proto): `Generate`, `GenerateStream`, health.

A thin `grpc.aio` server over the same `generation` module as the HTTP API, so a request
means the same on both. `await start_grpc(settings, backend)` serves on
`settings.gateway.host:grpc_port` and returns the started server (`await server.stop(grace)`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from services.gateway.auth import ApiKeys, GrpcAuth
from services.gateway.chat import chat_prompt
from services.gateway.generation import (
    REQUEST_ID, ApiError, Generation, GenerationRequest, Outcome, SpeculationRequest, invalid, plan,
)
from services.gateway.openai_models import ChatMessage, FunctionCall, MessageToolCall, NamedToolChoice, Tool
from services.gateway.tools import ToolPlan, ToolStream, tool_plan
from services.gateway.proto import generate_pb2 as pb
from services.gateway.proto import generate_pb2_grpc as pb_grpc
from shared.settings import Settings
from shared.tracing import trace_id

log = logging.getLogger("specmesh.gateway")

SERVICE_NAME = "specmesh.v1.TextGeneration"
DEFAULT_MAX_TOKENS = 16
DEFAULT_MAX_TOKENS_CHAT = 128  # with `messages`, as the chat API
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "tool_calls": pb.FINISH_REASON_TOOL_CALLS}
# HTTP statuses of ApiError as gRPC codes: the one place errors become replies.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _replies_errors(method):
    """Turns ApiError into its status code and anything unexpected into INTERNAL."""

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except ApiError as exc:
            await context.abort(STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
        except Exception:
            log.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "Internal error; see the gateway's log.")

    @functools.wraps(method)
    async def streaming(self, request, context):
        try:
            async for reply in method(self, request, context):
                yield reply
        except ApiError as exc:
            await context.abort(STATUS_CODES.get(exc.status, grpc.StatusCode.INTERNAL), exc.message)
        except Exception:
            log.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "Internal error; see the gateway's log.")

    return streaming if inspect.isasyncgenfunction(method) else unary


class TextGeneration(pb_grpc.TextGenerationServicer):
    def __init__(self, settings: Settings, backend):
        self.settings, self.backend = settings, backend

    def _start(self, request: pb.GenerateRequest) -> tuple[Generation, ToolPlan | None]:
        arrived = time.monotonic()
        if request.model and request.model not in getattr(self.backend, "model_names", [self.backend.model_name]):
            raise ApiError(404, f"The model {request.model!r} does not exist; this server serves "
                                f"{self.backend.model_name!r}.", param="model", code="model_not_found")
        if request.request_id and not REQUEST_ID.match(request.request_id):
            raise invalid("request_id must be 1-64 letters, digits, '-' or '_'.", "request_id")
        s, spec = request.sampling, request.speculation
        speculation = None
        if request.HasField("speculation"):
            speculation = SpeculationRequest(
                chain=list(spec.chain) or None,
                k=list(spec.k) or None,
                enabled=spec.enabled if spec.HasField("enabled") else None,
                confidence_threshold=spec.confidence_threshold if spec.HasField("confidence_threshold") else None,
                slo_tpot_ms=spec.slo_tpot_ms if spec.HasField("slo_tpot_ms") else None,
            )
        tools = _tool_plan(request)
        response_format = s.response_format if s.HasField("response_format") else None
        json_schema = s.json_schema if s.HasField("json_schema") else None
        regex = s.regex if s.HasField("regex") else None
        if tools and tools.constrained:  # the output is the list of calls, as the chat API makes it
            for param, given in (("response_format", response_format), ("min_tokens", s.HasField("min_tokens")),
                                 ("ignore_eos", s.HasField("ignore_eos") and s.ignore_eos)):
                if given:
                    raise invalid(f"{param} cannot be combined with tool_choice {tools.choice!r}: the output is the "
                                  f"list of calls, then the end of sequence.", param)
            response_format, json_schema, regex = "json_schema", tools.schema(), None
        job, stops = plan(self.backend, self.settings, GenerationRequest(
            request_id=request.request_id or f"gen-{uuid.uuid4().hex}",
            prompt=self._prompt(request, tools), prompt_param="messages" if request.messages else "prompt",
            max_tokens=request.max_tokens if request.HasField("max_tokens") else None,
            default_max_tokens=DEFAULT_MAX_TOKENS_CHAT if request.messages else DEFAULT_MAX_TOKENS,
            temperature=s.temperature if s.HasField("temperature") else None,
            top_p=s.top_p if s.HasField("top_p") else None,
            top_k=s.top_k if s.HasField("top_k") else None,
            min_p=s.min_p if s.HasField("min_p") else None,
            seed=s.seed if s.HasField("seed") else None,
            presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else None,
            frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else None,
            repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else None,
            logit_bias=dict(s.logit_bias) or None,
            min_tokens=s.min_tokens if s.HasField("min_tokens") else None,
            ignore_eos=s.ignore_eos if s.HasField("ignore_eos") else None,
            stop_token_ids=list(s.stop_token_ids) or None,
            allowed_token_ids=list(s.allowed_token_ids) or None,
            response_format=response_format, json_schema=json_schema, regex=regex,
            tool_calls=bool(tools and tools.constrained),
            stop=list(request.stop),
            speculation=speculation,
            logprobs=request.logprobs if request.HasField("logprobs") else -1,
            cache_salt=request.cache_salt if request.HasField("cache_salt") else None,
            truncate_prompt_tokens=request.truncate_prompt_tokens if request.HasField("truncate_prompt_tokens") else None,
            priority=request.priority if request.HasField("priority") else None,
            prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else -1,
        ))
        cfg = self.settings.gateway
        return Generation(self.backend, job, stops, timeout_s=cfg.request_timeout_s,
                          log_prompt=cfg.max_log_len if cfg.log_requests else None,
                          include_stop=request.include_stop_str_in_output,
                          started=arrived), tools

    def _prompt(self, request: pb.GenerateRequest, tools: ToolPlan | None = None) -> str | list[int]:
        """The request's prompt: its token ids, its text, or its conversation rendered as the chat API does."""
        if not request.messages:
            return list(request.prompt_token_ids) or request.prompt
        if request.prompt or request.prompt_token_ids:
            raise invalid("Give the prompt as messages, or as prompt / prompt_token_ids, not both.", "messages")
        messages = []
        for i, m in enumerate(request.messages):
            if m.role not in CHAT_ROLES:
                raise invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}.",
                              f"messages[{i}].role")
            calls = [MessageToolCall(id=c.id or None, function=FunctionCall(name=c.name, arguments=c.arguments))
                     for c in m.tool_calls]
            messages.append(ChatMessage(role=m.role, content=m.content, tool_calls=calls or None,
                                        tool_call_id=m.tool_call_id or None))
        return chat_prompt(self.backend.tokenizer(), messages, tools)

    @_replies_errors
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        _trace_metadata(context)
        generation, tools = self._start(request)
        out = await generation.run()
        found = tools.read(out.text) if tools and tools.parses and out.finish_reason == "stop" else None
        text, calls = (out.text, None) if found is None else (found[0] or "", found[1])
        return pb.GenerateResponse(request_id=generation.job.request_id, text=text, token_ids=out.token_ids,
                                   logprobs=_logprobs(out.logprobs), **_summary(out, tools, calls))

    @_replies_errors
    async def GenerateStream(self, request: pb.GenerateRequest, context):
        _trace_metadata(context)
        generation, tools = self._start(request)
        request_id = generation.job.request_id
        held = ToolStream(tools) if tools and tools.parses else None  # what may be calls waits for the end

        def message(delta) -> pb.GenerateStreamResponse:
            return pb.GenerateStreamResponse(request_id=request_id, text=delta.text, token_ids=delta.token_ids,
                                             logprobs=_logprobs(delta.logprobs))

        async for delta in generation.deltas():
            for part in held.feed(delta) if held else [delta]:
                yield message(part)
        calls = None
        if held:
            rest, calls = held.finish(generation.outcome.finish_reason)
            for part in rest:
                yield message(part)
        yield pb.GenerateStreamResponse(request_id=request_id, **_summary(generation.outcome, tools, calls))


def _trace_metadata(context) -> None:
    """The request's trace id as trailing metadata `x-trace-id` (`specmesh trace show`)."""
    tid = trace_id()
    if tid:
        context.set_trailing_metadata((("x-trace-id", tid),))


def _logprobs(logprobs) -> list:
    return [pb.TokenLogprob(logprob=lp.logprob, top_token_ids=lp.top_ids, top_logprobs=lp.top_logprobs,
                            rank=lp.rank or None) for lp in logprobs]


def _tool_plan(request: pb.GenerateRequest) -> ToolPlan | None:
    """The request's tools, checked as the chat API checks them (None without tools)."""
    from pydantic import TypeAdapter, ValidationError

    if not request.tools:
        if request.tool_choice not in ("", "none") or request.HasField("parallel_tool_calls"):
            raise invalid("tool_choice and parallel_tool_calls need tools: give the functions the model may call in "
                          "`tools`.", "tool_choice")
        return None
    if not request.messages:
        raise invalid("tools go with a conversation: give the prompt as `messages`.", "tools")
    try:
        tools = TypeAdapter(list[Tool]).validate_json(request.tools)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise invalid(f"tools must be OpenAI's chat `tools` list as JSON; at {where or 'the top'}: {first['msg']}.",
                      "tools") from None
    choice = request.tool_choice or None
    if choice not in (None, "auto", "none", "required"):
        choice = NamedToolChoice(type="function", function={"name": choice})
    return tool_plan(tools, choice, request.parallel_tool_calls if request.HasField("parallel_tool_calls") else None)


def _summary(out: Outcome, tools: ToolPlan | None = None, calls: list[dict] | None = None) -> dict:
    """finish_reason, stop_reason, usage, speculation and timings of a finished generation (and
    the calls it made, with `tools`), as proto fields."""
    spec = out.speculation
    levels = [pb.LevelStats(name=lv["name"], drafted=lv["drafted"], accepted=lv["accepted"],
                            acceptance_rate=lv["acceptance_rate"] or 0.0,
                            accepted_per_position=lv["accepted_per_position"]) for lv in spec.get("levels", [])]
    t = out.timings
    reason = out.stop_reason
    stop = {} if reason is None else {"stop_string": reason} if isinstance(reason, str) else {"stop_token_id": reason}
    finish = tools.finish_reason(calls, out.finish_reason) if tools else out.finish_reason
    return stop | {
        "prompt_logprobs": _logprobs(out.prompt_logprobs),
        "tool_calls": [pb.ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
                       for c in calls or []],
        "finish_reason": FINISH[finish],
        "usage": pb.Usage(**out.usage),
        "speculation": pb.SpeculationStats(chain=spec.get("chain", []), k=spec.get("k", []), levels=levels,
                                           slo_tpot_ms=spec.get("slo_tpot_ms"), slo_met=spec.get("slo_met")),
        "timings": pb.Timings(**{name: t.get(name) or 0.0 for name in
                                 ("first_token_ms", "total_ms", "inter_token_ms", "tokens_per_s")}),
    }


async def start_grpc(settings: Settings, backend, tracer_provider=None) -> grpc.aio.Server:
    """Serve `TextGeneration` and `grpc.health.v1.Health` on the gateway's gRPC port; returns the started server.

    The bound port is `server.port` (useful when `grpc_port` was 0, as in tests). TLS when
    the gateway has a certificate (`gateway.ssl_certfile`). With a
    `tracer_provider`, every call is a server span (OpenTelemetry's gRPC instrumentation).
    """
    interceptors = [GrpcAuth(ApiKeys(settings))]
    if tracer_provider is not None:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptors.append(aio_server_interceptor(tracer_provider=tracer_provider))
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_TextGenerationServicer_to_server(TextGeneration(settings, backend), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    cfg = settings.gateway
    address = f"{cfg.host}:{cfg.grpc_port}"
    if cfg.tls:
        credentials = grpc.ssl_server_credentials([(cfg.ssl_keyfile.read_bytes(), cfg.ssl_certfile.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.port = port
    server.health = health
    log.info("gRPC on %s:%d", cfg.host, port)
    return server
