"""Tool calling on the chat endpoint: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.

The family's chat template (generation.render_chat) has a line for the tools and writes a
turn that calls tools as one JSON list, `[{"name": ..., "arguments": {...}}, ...]`; an
assistant message's `tool_calls` are rendered that way too, so a model tuned on the template
sees its own calls in the form it writes them. What `tool_choice` does:

- "none": the tools are in the prompt; the output is text.
- "auto" (the default with tools): the output is free; when, whole, it is such a list of
  calls to the request's tools, it is returned as `tool_calls` (finish_reason
  "tool_calls"), otherwise as text (vLLM's auto tool choice, with this template's parser).
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

from services.gateway.generation import invalid
from shared.engine.json_schema import canonical_schema, compile_schema

MAX_TOOLS = 128  # OpenAI's limit
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
CALLS_START = '[{"name"'  # how a call list starts, whitespace aside


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

    def calls(self, text: str) -> list[dict] | None:
        """The output as OpenAI `tool_calls` when it is a list of calls to these tools (None if not)."""
        try:
            found = json.loads(text)
        except ValueError:
            return None
        names = {f["name"] for f in self.functions}
        if not isinstance(found, list) or not found or not all(
                isinstance(c, dict) and set(c) == {"name", "arguments"} and c["name"] in names
                and isinstance(c["arguments"], dict) for c in found):
            return None
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                for c in found]

    def finish_reason(self, calls: list[dict] | None, finish_reason: str) -> str:
        if calls is None or self.choice == "named":
            return finish_reason
        return "tool_calls"


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
        parameters = f.parameters if f.parameters is not None else NO_ARGUMENTS
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


def chat_messages(messages, tools: ToolPlan | None) -> list[tuple[str, str]]:
    """(role, text) per line of the template: the tools first, then each message; an
    assistant message's tool calls written as the list the model writes."""
    lines = [("tools", tools.prompt_line())] if tools else []
    for i, m in enumerate(messages):
        text = m.text()
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    arguments = None
                if not isinstance(arguments, dict):
                    raise invalid(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object as text, "
                                  f"got {call.function.arguments[:40]!r}.", f"messages[{i}].tool_calls")
                calls.append({"name": call.function.name, "arguments": arguments})
            text = " ".join(filter(None, [text, json.dumps(calls, ensure_ascii=False)]))
        lines.append((m.role, text))
    return lines


class ToolStream:
    """One streamed choice under tools: text goes out as it comes unless it may be a call
    list, which is held until the output ends (then sent as calls, or as text if it is not one)."""

    def __init__(self, tools: ToolPlan):
        self.tools = tools
        self.held: list = []  # the deltas held back
        self.text = ""
        self.open = tools.constrained  # None: undecided; True: held to the end; False: text, sent as it comes
        self.decided = tools.constrained

    def feed(self, delta) -> list:
        """The deltas to send now for `delta`."""
        if self.decided and not self.open:
            return [delta]
        self.held.append(delta)
        self.text += delta.text
        if self.decided:
            return []
        head = "".join(self.text.split())
        if CALLS_START.startswith(head):  # nothing yet, or the start of a call list: wait
            return []
        self.decided, self.open = True, head.startswith(CALLS_START)
        if self.open:
            return []
        held, self.held = self.held, []
        return held

    def finish(self, finish_reason: str) -> tuple[list, list[dict] | None]:
        """(the held deltas to send as text, the calls) when the output ends."""
        calls = self.tools.calls(self.text) if self.held and finish_reason == "stop" else None
        if calls is not None:
            return [], calls
        held, self.held = self.held, []
        return held, None
