"""Tool calling on the chat endpoint: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.

The family's chat template (services/gateway/chat.py) has a line for the tools and writes a
turn that calls tools as one JSON list, `[{"name": ..., "arguments": {...}}, ...]`; an
assistant message's `tool_calls` are rendered that way too, so a model tuned on the template
sees its own calls in the form it writes them. A checkpoint with its own chat template gets
the tools through it. What `tool_choice` does:

- "none": the tools are in the prompt; the output is text.
- "auto" (the default with tools): the output is free; when it calls the request's tools
  (whole, such a list; or `<tool_call>{...}</tool_call>` blocks after any text, as
  checkpoints trained on the Hermes format write), it is returned as `tool_calls`
  (finish_reason "tool_calls"), otherwise as text (vLLM's auto tool choice, with these parsers).
- "required": the output is constrained, token by token at every level of the chain, to
  that list (one call or more, at most one without `parallel_tool_calls`), each call's
  arguments to its function's `parameters` schema (the automaton of response_format
  json_schema: shared/engine/json_schema.py).
- {"type": "function", "function": {"name": ...}}: one call of that function, constrained
  the same way; finish_reason "stop", as OpenAI and vLLM answer a forced function.

A constrained output cut by max_tokens is not a list of calls: it comes back as text, with
finish_reason "length". Streamed, the calls come whole in one chunk when the output ends
(`ToolStream`); text that cannot start a call list is streamed as it comes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from services.gateway.generation import Delta, invalid
from shared.engine.json_schema import canonical_schema, compile_schema

MAX_TOOLS = 128  # OpenAI's limit
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
CALLS_START = '[{"name"'  # how a call list starts, whitespace aside
TAG, END_TAG = "<tool_call>", "</tool_call>"  # around each call, as the Hermes format writes them


@dataclass(frozen=True)
class ToolPlan:
    """A chat request's tools, checked: what the prompt shows and what the output must be."""

    functions: tuple[dict, ...]  # {"name", "description"?, "parameters"} per tool, in the request's order
    choice: str  # "none" | "auto" | "required" | "named"
    name: str | None = None  # the named function
    parallel: bool = True

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def parses(self) -> bool:
        """Whether the output is read for calls."""
        return self.choice != "none"

    def prompt_line(self) -> str:
        """The template's tools line: what each function is and how to call them."""
        listed = json.dumps(list(self.functions), ensure_ascii=False, separators=(",", ":"))
        return (f'{listed} To call tools, answer with only a JSON list: [{{"name": <tool>, "arguments": '
                f'{{...}}}}, ...].')

    def schema(self) -> str:
        """The json_schema (as text) of the output under "required" or a named function."""
        chosen = [f for f in self.functions if self.choice != "named" or f["name"] == self.name]
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                  "required": ["name", "arguments"]} for f in chosen]
        items = calls[0] if len(calls) == 1 else {"anyOf": calls}
        one = self.choice == "named" or not self.parallel
        return canonical_schema({"type": "array", "items": items, "minItems": 1} | ({"maxItems": 1} if one else {}))

    def read(self, text: str) -> tuple[str | None, list[dict]] | None:
        """(the text before the calls or None, OpenAI `tool_calls`) when the output calls these
        tools: whole, a call list (the family's template); or text, then `<tool_call>{"name":
        ..., "arguments": {...}}</tool_call>` blocks (what Hermes, Qwen and others are trained
        on, asked for by their templates). None if it calls nothing, or anything else."""
        stripped = text.strip()
        if stripped.startswith("["):
            content, found = None, _json(stripped)
        elif TAG in text:
            content = text[:text.index(TAG)]
            blocks = text[len(content):].strip()
            found = []
            while blocks.startswith(TAG):
                end = blocks.find(END_TAG)
                if end < 0:
                    return None
                found.append(_json(blocks[len(TAG):end].strip()))
                blocks = blocks[end + len(END_TAG):].strip()
            if blocks:
                return None
            content = content if content.strip() else None  # as it came (vLLM's Hermes parser too)
        else:
            return None
        names = {f["name"] for f in self.functions}
        if not isinstance(found, list) or not found or not all(
                isinstance(c, dict) and set(c) == {"name", "arguments"} and c["name"] in names
                and isinstance(c["arguments"], dict) for c in found):
            return None
        return content, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {
            "name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}} for c in found]

    def finish_reason(self, calls: list[dict] | None, finish_reason: str) -> str:
        if calls is None or self.choice == "named":
            return finish_reason
        return "tool_calls"


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def tool_plan(tools: list | None, tool_choice, parallel_tool_calls: bool | None) -> ToolPlan | None:
    """The request's `ToolPlan` (None without tools); a 400 for a tool or choice that cannot be served."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise invalid("tool_choice needs tools: give the functions the model may call in `tools`.", "tool_choice")
        return None
    if not tools:
        raise invalid("tools must hold at least one tool (leave it out for none).", "tools")
    if len(tools) > MAX_TOOLS:
        raise invalid(f"tools holds {len(tools)} tools; at most {MAX_TOOLS}.", "tools")
    functions: list[dict] = []
    for i, tool in enumerate(tools):
        f = tool.function
        parameters = NO_ARGUMENTS if f.parameters is None else f.parameters or {"type": "object"}  # {}: any arguments
        try:
            automaton = compile_schema(canonical_schema(parameters))
        except ValueError as exc:
            raise invalid(f"tools[{i}].function.parameters ({f.name}): {exc}.", f"tools[{i}].function.parameters") \
                from None
        if automaton.root_kind != "object":
            raise invalid(f"tools[{i}].function.parameters ({f.name}) must be an object schema (type: object).",
                          f"tools[{i}].function.parameters")
        if any(g["name"] == f.name for g in functions):
            raise invalid(f"tools names the function {f.name!r} twice.", f"tools[{i}].function.name")
        functions.append({"name": f.name} | ({"description": f.description} if f.description else {})
                         | {"parameters": parameters})
    name = None
    if tool_choice is None:
        choice = "auto"
    elif isinstance(tool_choice, str):
        choice = tool_choice
    else:
        choice, name = "named", tool_choice.function.name
        if all(f["name"] != name for f in functions):
            raise invalid(f"tool_choice names the function {name!r}, which tools does not hold (it holds "
                          f"{', '.join(f['name'] for f in functions)}).", "tool_choice")
    return ToolPlan(tuple(functions), choice, name, parallel_tool_calls is not False)


class ToolStream:
    """One streamed choice under tools. Text goes out as it comes, but for what may be calls:
    an output that starts like a call list, or from a `<tool_call>` tag on, is held until
    the output ends, then sent as calls (with any text before the tag), or as text if it is
    none. A delta whose text ends in what may be the start of a tag waits for the next."""

    def __init__(self, tools: ToolPlan):
        self.tools = tools
        self.held: list = []  # deltas not sent yet
        self.text = ""  # the output so far
        self.sent = 0  # characters of it sent
        self.holding = tools.constrained  # held to the end

    def feed(self, delta) -> list:
        """The deltas to send now for `delta`."""
        self.held.append(delta)
        self.text += delta.text
        if self.holding:
            return []
        unsent = self.text[self.sent:]
        if not self.sent:
            head = "".join(unsent.split())
            if head.startswith(CALLS_START) or TAG in unsent:
                self.holding = True
                return []
            if CALLS_START.startswith(head):  # nothing yet, or the start of a call list: wait
                return []
        if TAG in unsent:
            self.holding = True
            return []
        if any(unsent.endswith(TAG[:n]) for n in range(1, len(TAG))):  # a tag may be starting
            return []
        held, self.held, self.sent = self.held, [], len(self.text)
        return held

    def finish(self, finish_reason: str) -> tuple[list, list[dict] | None]:
        """(the deltas to send as text, the calls) when the output ends."""
        found = self.tools.read(self.text) if self.held and finish_reason == "stop" else None
        if found is None:
            held, self.held = self.held, []
            return held, None
        content, calls = found
        rest = (content or "")[self.sent:]  # the text before the calls not sent yet (content starts the output)
        return ([Delta(rest, [])] if rest else []), calls
