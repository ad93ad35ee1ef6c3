"""The OpenAI-compatible HTTP API: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`.

Built by `create_app(settings, service)`; `service.backend` (a `Backend`) does the generating.
Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`:
400 bad input, 404 unknown model or path, 413 body too large, 503 backend unavailable,
504 timeout. Try it: `curl localhost:18000/v1/completions -H 'content-type: application/json'
-d '{"model": "specmesh", "prompt": "def f(", "max_tokens": 16, "temperature": 0}'`.
"""

from __future__ import annotations

import asyncio
import re
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.auth import ApiKeys, http_middleware
from services.gateway.choices import MAX_CHOICES, choice_requests, merged, plan_all, run_all
from services.gateway.chat import chat_prompt
from services.gateway.generation import MAX_STOP_STRINGS, ApiError, Generation, GenerationRequest, invalid, unavailable
from services.gateway.openai_models import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, DetokenizeRequest,
    DetokenizeResponse, ERRORS, ModelList, TokenizeRequest, TokenizeResponse,
)
from services.gateway.reasoning import Thinking, ThinkingStream
from services.gateway.reply import Reply
from services.gateway.background import BackgroundResponses
from services.gateway.response_store import StoreError
from services.gateway.responses import ResponsesReply, ResponsesRequest
from services.gateway.responses_routes import register_responses
from services.gateway.tools import ToolPlan, ToolStream, tool_plan
from shared import __version__
from shared.service import ping
from shared.settings import SERVICES, Settings
from shared.tracing import trace_id

log = logging.getLogger("specmesh.gateway")

MAX_BODY_BYTES = 1 << 20  # a context's worth of text is far smaller
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 128, "responses": 128}
# What a field must look like, for validation errors whose own words would not say.
FIELD_HINTS = {
    "prompt": f"a string, a list of token ids, or a list of up to {MAX_CHOICES} of either",
    "stop": f"a string or a list of up to {MAX_STOP_STRINGS} non-empty strings",
    "messages": "a non-empty list of {role, content} messages",
    "messages.content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts (only text is supported)",
    "speculation": "{chain: 'drafter,target' or a list, k: int or list, enabled: bool, confidence_threshold: 0..1, slo_tpot_ms: ms > 0}",
    "speculation.chain": "model names bottom level first, as 'drafter,target' or ['drafter', 'target']",
    "speculation.k": "an integer in [0, 16], or a list of them with one per proposing level",
}


def create_app(settings: Settings, service) -> FastAPI:
    app = FastAPI(title="SpecMesh", version=__version__,
                  description="OpenAI-compatible API over multi-level speculative decoding.")
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.middleware("http")(http_middleware(ApiKeys(settings)))
    if settings.gateway.cors_allow_origins:  # added last, so outermost: a preflight is answered before the API key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=settings.gateway.cors_allow_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id", "x-trace-id", "retry-after"])
    _install_error_handlers(app)
    started = int(time.time())
    background = BackgroundResponses()  # this gateway's background responses in flight
    app.state.background = background

    @app.get("/health")
    async def health() -> dict:
        """Each service as up or down, from a NATS `micro` ping."""
        others = [name for name in SERVICES if name != "gateway"]
        replies = await asyncio.gather(*(ping(service.nc, name, timeout_s=1.0) for name in others))
        services = {"gateway": "up"} | {name: ("up" if reply else "down") for name, reply in zip(others, replies)}
        return {"status": "ok" if all(v == "up" for v in services.values()) else "degraded", "services": services}

    def backend():
        found = getattr(service, "backend", None)
        if found is None:
            raise unavailable("The gateway is not connected to its backend yet; retry shortly.")
        return found

    def model_card(b, name: str | None = None) -> dict:
        return {"id": name or b.model_name, "object": "model", "created": started, "owned_by": "specmesh",
                "max_model_len": b.max_context}

    @app.get("/version")
    async def version() -> dict:
        """vLLM's: the running SpecMesh's version."""
        return {"version": __version__}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus metrics of the gateway (latencies, requests, tokens)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        registry = getattr(service, "registry", None)
        return Response(generate_latest(registry) if registry is not None else b"", media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> dict:
        """The served model."""
        b = backend()
        return {"object": "list", "data": [model_card(b, name) for name in getattr(b, "model_names", [b.model_name])]}

    @app.get("/v1/models/{model_id}", responses=ERRORS)
    async def model(model_id: str) -> dict:
        b = backend()
        _check_model(b, model_id)
        return model_card(b, model_id)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict:
        """vLLM's: the token ids of a prompt (or of chat messages, as the chat endpoint renders them)."""
        b = backend()
        _check_model(b, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise invalid("Give either prompt or messages.", "prompt")
        prompt = body.prompt if body.messages is None else chat_prompt(b.tokenizer(), body.messages)
        ids = list(b.tokenizer().encode(prompt)) if isinstance(prompt, str) else prompt
        return {"count": len(ids), "max_model_len": b.max_context, "tokens": ids}

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict:
        """vLLM's: the text of token ids."""
        b = backend()
        _check_model(b, body.model)
        tok = b.tokenizer()
        bad = [t for t in body.tokens if not 0 <= t < len(tok)]
        if bad:
            raise invalid(f"Token ids must be in [0, {len(tok)}); got {bad[0]}.", "tokens")
        return {"prompt": tok.decode(body.tokens)}

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        """Text completion; `stream: true` for server-sent events."""
        return await serve(request, body, "completion", body.prompt_values(), "prompt")

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Chat completion: the messages (and tools) become one prompt (`chat.chat_prompt`)."""
        tools = tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls)
        prompt = chat_prompt(backend().tokenizer(), body.messages, tools, body.rendering())
        return await serve(request, body, "chat", [prompt], "messages", tools)

    def thinking(prompt: str | list[int]) -> Thinking | None:
        """How a chat's output splits into thinking and answer (`gateway.reasoning_parser`)."""
        if settings.gateway.reasoning_parser == "none":
            return None
        return Thinking.after(prompt if isinstance(prompt, str) else backend().tokenizer().decode(prompt[-8:]))

    def response_store():
        """Where Responses API answers are kept (response_store.py); None when none are."""
        return getattr(service, "responses", None) if settings.gateway.responses_store else None
    async def serve(http: Request, body, kind: str, prompts: list, prompt_param: str, tools: ToolPlan | None = None,
                    original: ResponsesRequest | None = None, keep=None):
        arrived = time.monotonic()
        b = backend()
        _check_model(b, body.model)
        refused = body.unsupported()
        if refused:
            raise invalid(refused[1], refused[0])
        if body.prompt_logprobs is not None and body.stream:
            raise invalid("prompt_logprobs are not available with stream: true (vLLM's rule).", "prompt_logprobs")
        request_id = {"chat": "chatcmpl-", "completion": "cmpl-", "responses": "resp_"}[kind] + uuid.uuid4().hex
        response_format, json_schema, regex = body.response_format_spec()  # a shape unsupported() let through
        if tools and tools.constrained:
            for param, value in (("response_format", response_format), ("min_tokens", body.min_tokens),
                                 ("ignore_eos", body.ignore_eos)):
                if value:
                    raise invalid(f"{param} cannot be combined with tool_choice {tools.choice!r}: the output is the "
                                  f"list of calls, then the end of sequence.", param)
            response_format, json_schema, regex = "json_schema", tools.schema(), ""
        max_tokens = body.max_tokens
        if getattr(body, "max_completion_tokens", None) is not None:  # chat's newer name
            max_tokens = body.max_completion_tokens
        request = GenerationRequest(
            request_id=request_id, prompt=prompts[0], max_tokens=max_tokens, default_max_tokens=DEFAULT_MAX_TOKENS[kind],
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=body.seed,
            stop=body.stop, truncate_prompt_tokens=body.truncate_prompt_tokens, priority=body.priority,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, logit_bias=body.logit_bias, min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos, stop_token_ids=body.stop_token_ids, allowed_token_ids=body.allowed_token_ids,
            response_format=response_format, json_schema=json_schema, regex=regex,
            tool_calls=bool(tools and tools.constrained),
            speculation=body.speculation.to_request() if body.speculation else None, prompt_param=prompt_param,
            logprobs=body.logprobs_wanted(), echo=bool(getattr(body, "echo", False)), cache_salt=body.cache_salt,
            prompt_logprobs=-1 if body.prompt_logprobs is None else body.prompt_logprobs,
        )
        tid = trace_id()  # the request's trace (`specmesh trace show <request id>`)
        headers = {"x-request-id": request_id} | ({"x-trace-id": tid} if tid else {})
        try:
            planned = plan_all(b, settings, choice_requests(request, prompts, body.n or 1))
            generations = [Generation(b, job, stops, timeout_s=settings.gateway.request_timeout_s, started=arrived,
                                      log_prompt=settings.gateway.max_log_len if settings.gateway.log_requests else None,
                                      include_stop=bool(body.include_stop_str_in_output),
                                      operation="text_completion" if kind == "completion" else "chat")
                           for job, stops in planned]
            if kind == "responses":
                reply = ResponsesReply(request_id, b.model_name, original, tools, thinking(prompts[0]), keep,
                                       b.tokenizer)
                if original.background:
                    try:
                        queued = await background.start(response_store(), reply, generations[0],
                                                        {"input_items": original.input_items(), "conversation": None},
                                                        settings.gateway.request_timeout_s, stream=bool(body.stream))
                    except StoreError as exc:
                        raise unavailable(f"The response cannot be stored now ({exc}); retry shortly.") from None
                    if body.stream:  # its events as they come; a client gone stops nothing (GET resumes)
                        return StreamingResponse(background.events(request_id).read(), media_type="text/event-stream",
                                                 headers=headers | {"cache-control": "no-cache"})
                    return JSONResponse(queued, headers=headers)
                if body.stream:
                    return await stream_response(generations[0], reply, headers)
            else:
                reply = Reply(kind, request_id, b.model_name, body, b.tokenizer, [job for job, _ in planned], prompts,
                              tools, thinking(prompts[0]) if kind == "chat" else None)
                if body.stream:
                    return await stream(generations, reply, headers)
            outcomes = await _unless_disconnected(http, run_all(generations))
            if outcomes is None:
                return Response(status_code=499)  # nobody to read it; the generation was cancelled
        except ApiError as exc:
            exc.headers = headers | (getattr(exc, "headers", None) or {})
            raise
        whole = await reply.whole(outcomes) if kind == "responses" else reply.whole(outcomes)
        return JSONResponse(whole | ({"trace_id": tid} if tid else {}), headers=headers)

    async def stream(generations: list[Generation], reply: Reply, headers: dict) -> StreamingResponse:
        reply.live = [g.outcome for g in generations]
        deltas = merged(generations)
        first = await anext(deltas, None)  # errors before the first token still get their status code

        async def events() -> AsyncIterator[str]:
            try:
                if reply.kind == "chat":
                    for index in range(len(generations)):
                        yield reply.sse(reply.chunk(index, {"role": "assistant", "content": ""}))
                pending = [first] if first is not None else []
                echoed: set[int] = set()
                calls = {i: ToolStream(reply.tools) for i in range(len(generations))} \
                    if reply.kind == "chat" and reply.tools and reply.tools.parses else {}
                thoughts = {i: ThinkingStream(reply.thinking) for i in range(len(generations))} if reply.thinking else {}

                def sent(index: int, parts) -> list[str]:
                    """The chunks of these (kind, delta) parts: thinking as reasoning_content, the
                    answer as content (or held by the tool calls' stream)."""
                    out = []
                    for kind, part in parts:
                        if kind == "reasoning":
                            if part.text or (part.token_ids and (reply.token_ids or reply.logprobs)):
                                out.append(reply.sse(reply.chunk(index, {"reasoning_content": part.text},
                                                                 part.token_ids, logprobs=part.logprobs)))
                            continue
                        for answer in calls[index].feed(part) if index in calls else [part]:
                            if answer.text or (answer.token_ids and (reply.token_ids or reply.logprobs)):
                                out.append(reply.sse(reply.chunk(index, answer.text, answer.token_ids,
                                                                 logprobs=answer.logprobs)))
                    return out

                while True:
                    item = pending.pop() if pending else await anext(deltas, None)
                    if item is None:
                        break
                    index, delta = item
                    if reply.echo and index not in echoed:  # the prompt's log-probabilities came with its first tokens
                        echoed.add(index)
                        yield reply.sse(reply.prompt_chunk(index, generations[index].outcome))
                    if delta is None:  # this choice has ended
                        out, made = generations[index].outcome, None
                        for chunk in sent(index, thoughts[index].finish()) if index in thoughts else []:
                            yield chunk
                        if index in calls:  # what was held back: text, or the calls
                            held, made = calls[index].finish(out.finish_reason)
                            for part in held:
                                yield reply.sse(reply.chunk(index, part.text, part.token_ids, logprobs=part.logprobs))
                            if made:
                                yield reply.sse(reply.tool_chunk(index, made))
                        yield reply.sse(reply.finish_chunk(index, out, made))
                    elif reply.echo_only:
                        continue  # the prompt alone was asked for
                    else:
                        for chunk in sent(index, thoughts[index].feed(delta) if index in thoughts else [("content", delta)]):
                            yield chunk
                if reply.include_usage:
                    yield reply.sse(reply.usage_chunk([g.outcome for g in generations]))
            except ApiError as exc:
                yield reply.sse(exc.body())
            except Exception:
                log.exception("request %s failed mid-stream", reply.request_id)
                yield reply.sse(ApiError(500, "Internal error; see the gateway's log.", type="server_error").body())
            yield "data: [DONE]\n\n"

        return SSEResponse(events(), deltas, headers=headers | {"cache-control": "no-cache"})

    async def stream_response(generation: Generation, reply: ResponsesReply, headers: dict) -> StreamingResponse:
        deltas = merged([generation])
        first = await anext(deltas, None)  # errors before the first token still get their status code
        return SSEResponse(reply.events(generation, first, deltas), deltas,
                           headers=headers | {"cache-control": "no-cache"})

    register_responses(app, settings, backend, serve, background, response_store)
    return app


async def _unless_disconnected(request: Request, work):
    """The result of `work`, or None (and `work` cancelled) if the client hangs up first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watch.cancel()
        raise
    if task in done:
        watch.cancel()
        return task.result()
    task.cancel()  # Generation.deltas' cleanup cancels the backend's generation
    await asyncio.wait([task])
    return None


class SSEResponse(StreamingResponse):
    """Server-sent events that close the generation however the response ends (client gone included)."""

    def __init__(self, events: AsyncIterator[str], deltas, headers: dict):
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.deltas = deltas

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            # A disconnect cancels us wherever we are, maybe outside the generators; closing
            # `deltas` ends the backend's generation (Generation.deltas' cleanup survives the cancel).
            await _close_quietly(self.body_iterator)
            await _close_quietly(self.deltas)


async def _close_quietly(agen) -> None:
    try:
        await agen.aclose()
    except BaseException:  # noqa: BLE001 - a cancelled close still starts the cleanup task
        pass


def _check_model(backend, name: str) -> None:
    if name not in getattr(backend, "model_names", [backend.model_name]):
        raise ApiError(404, f"The model {name!r} does not exist; this server serves {backend.model_name!r} "
                            f"(see GET /v1/models).", param="model", code="model_not_found")


# -- errors -----------------------------------------------------------------------------
def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ApiError(status, message, type=type, param=param, code=code).body(), status_code=status,
                        headers=headers)


def _param(loc: tuple) -> str | None:
    """'messages[0].role' from a pydantic location, without its union-member tags."""
    param = ""
    for part in loc[1:]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" not in part and "-" not in part and part not in ("str", "int", "float", "bool", "list", "dict"):
            param += f".{part}" if param else part
    return param or None


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One message for FastAPI's validation errors, the first field's first; and its param."""
    if not errors:
        return "The request body is invalid.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}.", None
    loc = tuple(first.get("loc", ()))
    if len(loc) <= 1 and loc[:1] == ("body",):
        return "The request body must be a JSON object.", None
    param = _param(loc)
    if first.get("type") == "missing":
        return f"{param!r} is required.", param
    field = re.sub(r"\[\d+\]", "", param or "")
    same = [e for e in errors if (_param(tuple(e.get("loc", ()))) or "").startswith(param or "")]
    if field in FIELD_HINTS and len(same) > 1:  # a union: pydantic's first complaint would mislead
        return f"Invalid {param!r}: it must be {FIELD_HINTS[field]}.", param
    return f"Invalid {param!r}: {first.get('msg', 'invalid value')}.", param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"Unknown path {request.url.path}; see /docs for this API.",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, type="invalid_request_error" if exc.status_code < 500 else "server_error",
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, "Internal error; see the gateway's log.", type="server_error")


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413 (ASGI middleware; declared or chunked)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = _error(413, f"The request body is larger than {self.limit} bytes.", code="request_too_large")
        await response(scope, receive, send)
