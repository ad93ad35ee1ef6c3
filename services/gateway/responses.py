"""OpenAI's Responses API, `POST /v1/responses`, over the chat machinery (as vLLM serves it).

A request becomes a chat request (`ResponsesRequest.to_chat`): `instructions` the first
system message, `input` (text, or message / `function_call` / `function_call_output`
items) the messages, `text.format` the response_format, `tools` (flat function tools) the
chat tools, `max_output_tokens` max_tokens. The answer is a `response` object whose
`output` holds a `message` item (its `output_text`) and/or `function_call` items; streamed,
the Responses events (`response.created`, `response.output_text.delta`,
`response.function_call_arguments.delta`, ..., `response.completed`).

A response is stored unless the request says `store: false` (response_store.py): a later
request with `previous_response_id` continues its conversation (the earlier turns and
their outputs come before its own `input`; its `instructions` are its own, as in OpenAI's
API), and `GET` / `DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`
read and remove it.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from services.gateway.generation import ApiError, Outcome, invalid
from services.gateway.openai_models import (
    ChatCompletionRequest, FunctionName, SpeculationOptions,
)
from services.gateway.reasoning import Thinking, ThinkingStream
from services.gateway.tools import ToolPlan, ToolStream

log = logging.getLogger("specmesh.gateway")

MAX_INPUT_ITEMS = 1024


class InputText(BaseModel):
    type: Literal["input_text", "output_text"]
    text: StrictStr


class MessageItem(BaseModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: StrictStr | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    type: Literal["function_call"]
    call_id: StrictStr
    name: FunctionName
    arguments: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


class FunctionCallOutputItem(BaseModel):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr
    id: StrictStr | None = None
    status: StrictStr | None = None


class FunctionTool(BaseModel):
    type: Literal["function"]
    name: FunctionName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class NamedFunction(BaseModel):
    type: Literal["function"]
    name: FunctionName


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    name: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None
    description: StrictStr | None = None


class TextOptions(BaseModel):
    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """The Responses API's request (the fields SpecMesh takes; unknown ones are ignored)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: StrictStr
    input: StrictStr | Annotated[list[MessageItem | FunctionCallItem | FunctionCallOutputItem],
                                 Field(min_length=1, max_length=MAX_INPUT_ITEMS)]
    instructions: StrictStr | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = Field(None, description="Extension: seed for sampling.")
    stream: StrictBool = False
    text: TextOptions | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: StrictBool | None = None
    store: StrictBool | None = Field(None, description="Keep the response for previous_response_id and GET (default "
                                                       "true; the answer says whether it was kept).")
    previous_response_id: StrictStr | None = Field(None, description="Continue the conversation of this stored response.")
    metadata: dict[str, StrictStr] | None = None
    user: StrictStr | None = None
    cache_salt: StrictStr | None = Field(None, description="Extension (vLLM's): as on chat completions.")
    priority: StrictInt | None = Field(None, description="Extension (vLLM's): as on chat completions.")
    speculation: SpeculationOptions | None = Field(None, description="Extension: per-request speculation control.")

    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        return [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input

    def input_items(self) -> list[dict]:
        """The input as the API lists it back (`/input_items`): typed items, each with an id."""
        out = []
        for item in self.items():
            if isinstance(item, MessageItem):
                content = [{"type": "input_text", "text": item.content}] if isinstance(item.content, str) else \
                    [part.model_dump() for part in item.content]
                out.append({"type": "message", "id": _id("msg"), "role": item.role, "content": content})
            else:
                out.append(item.model_dump(exclude_none=True) | {"id": item.id or _id("fc" if isinstance(
                    item, FunctionCallItem) else "fco")})
        return out

    def turn(self) -> list[dict]:
        """This request's input as chat messages (the instructions apart)."""
        messages: list[dict] = []
        for item in self.items():
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last and last["role"] == "assistant" and "tool_calls" in last:  # calls of one turn
                    last["tool_calls"].append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return messages

    def to_chat(self, earlier: list[dict] = ()) -> ChatCompletionRequest:
        """The chat request this one is, after the `earlier` turns (a stored conversation's
        messages); a 400 for what has no chat equivalent."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages += [*earlier, *self.turn()]
        if not messages:
            raise invalid("input holds nothing to answer.", "input")
        chat: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_output_tokens,
                                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                                "stream": self.stream, "user": self.user, "cache_salt": self.cache_salt, "priority": self.priority,
                                "parallel_tool_calls": self.parallel_tool_calls}
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_schema":
            if fmt.schema_ is None:
                raise invalid("text.format json_schema needs a schema.", "text.format")
            chat["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.name or "output",
                                                                              "schema": fmt.schema_}}
        elif fmt is not None:
            chat["response_format"] = {"type": fmt.type}
        if self.tools is not None:
            chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if isinstance(self.tool_choice, NamedFunction):
            chat["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            chat["tool_choice"] = self.tool_choice
        if self.speculation is not None:
            chat["speculation"] = self.speculation
        try:
            return ChatCompletionRequest(**{k: v for k, v in chat.items() if v is not None})
        except ValidationError as exc:  # what the Responses shapes let through and chat's refuse
            first = exc.errors()[0]
            raise invalid(f"Invalid input: {first.get('msg', 'invalid value')}.", "input") from None


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def output_messages(output: list[dict]) -> list[dict]:
    """A response's output items as the chat turn a follow-up sees: the assistant's text and
    its tool calls in one message (reasoning items are not carried over)."""
    text = "".join(part.get("text", "") for item in output if item.get("type") == "message"
                   for part in item.get("content", []))
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                      "arguments": item["arguments"]}}
             for item in output if item.get("type") == "function_call"]
    if not text and not calls:
        return [{"role": "assistant", "content": ""}]
    return [{"role": "assistant", "content": text or None} | ({"tool_calls": calls} if calls else {})]


class ResponsesReply:
    """One response's bodies: the whole `response` object, or its stream of events."""

    def __init__(self, request_id: str, model: str, body: ResponsesRequest, tools: ToolPlan | None,
                 thinking: Thinking | None = None, keep: Callable[[dict], Awaitable[None]] | None = None):
        self.request_id, self.model, self.body = request_id, model, body
        self.keep = keep  # stores the finished response (and may set its `store` false if it could not)
        self.tools = tools if tools and tools.parses else None
        self.thinking = thinking  # the thinking as a reasoning item (reasoning.py)
        self.created = int(time.time())
        self.sequence = 0
        self.message_id, self.reasoning_id = _id("msg"), _id("rs")
        self.message_index = 0  # the message item's place in `output` (1 after a reasoning item)

    # -- the response object -------------------------------------------------------------
    def response(self, status: str, output: list[dict], out: Outcome | None = None) -> dict:
        body = self.body
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format \
            else {"type": "text"}
        choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunction) else \
            body.tool_choice or "auto"
        usage = None
        if out is not None:
            usage = {"input_tokens": out.prompt_tokens, "input_tokens_details": {"cached_tokens": out.cached_tokens},
                     "output_tokens": len(out.token_ids), "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": out.prompt_tokens + len(out.token_ids)}
        return {
            "id": self.request_id, "object": "response", "created_at": self.created, "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "reasoning": None, "store": self.keep is not None,
            "temperature": 1.0 if body.temperature is None else body.temperature, "text": {"format": fmt},
            "tool_choice": choice, "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled", "usage": usage,
            "user": body.user, "metadata": body.metadata or {},
        } | ({"speculation": out.speculation, "timings": out.timings} if out is not None and out.speculation else {})

    def message(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    @staticmethod
    def function_call(call: dict, status: str = "completed", arguments: str | None = None) -> dict:
        return {"type": "function_call", "id": _id("fc"), "call_id": call["id"], "name": call["function"]["name"],
                "arguments": call["function"]["arguments"] if arguments is None else arguments, "status": status}

    def reasoning(self, text: str, status: str = "completed") -> dict:
        return {"type": "reasoning", "id": self.reasoning_id, "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}

    def outputs(self, out: Outcome) -> tuple[list[dict], str]:
        """The output items of a finished generation, and the response's status."""
        reasoning, answer = self.thinking.split(out.text) if self.thinking else (None, out.text)
        found = self.tools.read(answer) if self.tools and out.finish_reason == "stop" else None
        text, calls = (answer, []) if found is None else (found[0], found[1])
        status = "completed" if out.finish_reason == "stop" else "incomplete"
        items = [self.reasoning(reasoning)] if reasoning is not None else []
        items += [self.message(text, status)] if text else []
        items += [self.function_call(call) for call in calls]
        return items, status

    async def whole(self, outcomes: list[Outcome]) -> dict:
        out = outcomes[0]
        items, status = self.outputs(out)
        return await self.kept(self.response(status, items, out))

    async def kept(self, final: dict) -> dict:
        """The finished response, stored first (unless the request said store: false)."""
        if self.keep is not None:
            await self.keep(final)
        return final

    # -- events ---------------------------------------------------------------------------
    def event(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.sequence} | fields
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'), ensure_ascii=False)}\n\n"

    def start(self) -> list[str]:
        opened = self.response("in_progress", [])
        return [self.event("response.created", response=opened), self.event("response.in_progress", response=opened)]

    def thinking_opened(self) -> str:
        return self.event("response.output_item.added", output_index=0,
                          item=self.reasoning("", "in_progress") | {"content": []})

    def thinking_delta(self, delta: str) -> str:
        return self.event("response.reasoning_text.delta", item_id=self.reasoning_id, output_index=0,
                          content_index=0, delta=delta)

    def thinking_closed(self, text: str) -> list[str]:
        self.message_index = 1
        return [self.event("response.reasoning_text.done", item_id=self.reasoning_id, output_index=0,
                           content_index=0, text=text),
                self.event("response.output_item.done", output_index=0, item=self.reasoning(text))]

    def text_opened(self) -> list[str]:
        at = self.message_index
        return [self.event("response.output_item.added", output_index=at, item=self.message("", "in_progress")
                           | {"content": []}),
                self.event("response.content_part.added", item_id=self.message_id, output_index=at, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": []})]

    def text_delta(self, delta: str) -> str:
        return self.event("response.output_text.delta", item_id=self.message_id, output_index=self.message_index,
                          content_index=0, delta=delta)

    def text_closed(self, text: str, status: str) -> list[str]:
        at = self.message_index
        part = {"type": "output_text", "text": text, "annotations": []}
        return [self.event("response.output_text.done", item_id=self.message_id, output_index=at, content_index=0,
                           text=text),
                self.event("response.content_part.done", item_id=self.message_id, output_index=at, content_index=0,
                           part=part),
                self.event("response.output_item.done", output_index=at, item=self.message(text, status))]

    def calls(self, calls: list[dict], first_index: int) -> tuple[list[str], list[dict]]:
        """The events of the calls, each whole, and their output items."""
        events, items = [], []
        for i, call in enumerate(calls, start=first_index):
            item = self.function_call(call, "in_progress", arguments="")
            events.append(self.event("response.output_item.added", output_index=i, item=item))
            arguments = call["function"]["arguments"]
            events.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                                     delta=arguments))
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                     arguments=arguments))
            items.append(item | {"arguments": arguments, "status": "completed"})
            events.append(self.event("response.output_item.done", output_index=i, item=items[-1]))
        return events, items

    async def finish(self, out: Outcome, items: list[dict], status: str) -> str:
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return self.event(kind, response=await self.kept(self.response(status, items, out)))

    async def events(self, generation, first, deltas) -> AsyncIterator[str]:
        """`generation`'s stream of events (`deltas` its merged deltas, `first` already read):
        a reasoning item's, then the message's, then each call's, then the finished response."""
        text, opened = "", False
        thought, thinking = "", None  # None: no reasoning item; False: open; True: closed
        calls = ToolStream(self.tools) if self.tools else None

        def written(parts, through_calls: bool = True) -> list[str]:
            """The events of these (kind, delta) parts: the reasoning item's, then the message's
            (the answer through the tool calls' stream, unless it comes back from there)."""
            nonlocal text, opened, thought, thinking
            out = []
            for kind, part in parts:
                if kind == "reasoning":
                    if thinking is None:
                        thinking = False
                        out.append(self.thinking_opened())
                    thought += part.text
                    out += [self.thinking_delta(part.text)] if part.text else []
                    continue
                if thinking is False and part.text:  # the answer begins: the thinking is done
                    thinking = True
                    out += self.thinking_closed(thought)
                for answer in calls.feed(part) if calls and through_calls else [part]:
                    if answer.text and not opened:
                        opened = True
                        out += self.text_opened()
                    text += answer.text
                    out += [self.text_delta(answer.text)] if answer.text else []
            return out

        try:
            for event in self.start():
                yield event
            split = ThinkingStream(self.thinking) if self.thinking else None
            pending = [first] if first is not None else []
            while True:
                item = pending.pop() if pending else await anext(deltas, None)
                if item is None or item[1] is None:
                    break
                for event in written(split.feed(item[1]) if split else [("content", item[1])]):
                    yield event
            out, made = generation.outcome, None
            for event in written(split.finish()) if split else []:
                yield event
            items = []
            if thinking is not None:
                if thinking is False:
                    for event in self.thinking_closed(thought):
                        yield event
                items.append(self.reasoning(thought))
            if calls:
                held, made = calls.finish(out.finish_reason)
                for event in written([("content", part) for part in held], through_calls=False):
                    yield event
            status = "completed" if out.finish_reason == "stop" else "incomplete"
            if opened:
                for event in self.text_closed(text, status):
                    yield event
                items.append(self.message(text, status))
            if made:
                made_events, made_items = self.calls(made, len(items))
                for event in made_events:
                    yield event
                items += made_items
            yield await self.finish(out, items, status)
        except ApiError as exc:
            yield self.failed(exc.body()["error"])
        except Exception:
            log.exception("request %s failed mid-stream", self.request_id)
            yield self.failed({"message": "Internal error; see the gateway's log.", "code": "server_error"})

    def failed(self, error: dict) -> str:
        return self.event("error", code=error.get("code"), message=error.get("message"), param=error.get("param"))
