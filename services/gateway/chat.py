"""A chat's prompt: the messages (and tools) rendered by the checkpoint's own chat template
when its tokenizer has one (`tokenizer.chat_template`, through transformers'
`apply_chat_template`, as vLLM does), else by the family's template below (the trained
family's tokenizer has none): one `Role: content` line per message, then `Assistant:`.

With the checkpoint's template the prompt is token ids (the template writes the special
tokens it wants; encoding its text again would add a second beginning of sequence), with
the family's it is text. Tool calls in earlier assistant messages go to a template as the
`tool_calls` it expects (arguments as objects); the family's template writes them as the
call list the model writes (services/gateway/tools.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from services.gateway.generation import invalid

ROLES = {"tools": "Tools", "system": "System", "developer": "System", "user": "User", "assistant": "Assistant",
         "tool": "Tool"}
CUE = "Assistant:"


def render_chat(messages: Sequence[tuple[str, str]]) -> str:
    """The family's template: `Role: content` per message, one per line, then `Assistant:`.

    >>> render_chat([("system", "Be brief."), ("user", "Hi")])
    'System: Be brief.\\nUser: Hi\\nAssistant:'
    """
    lines = [f"{ROLES[role]}: {content}" for role, content in messages]
    return "\n".join([*lines, CUE])


def chat_prompt(tokenizer, messages, tools=None) -> str | list[int]:
    """The prompt of a chat request's `messages` (ChatMessage models) and `tools` (a ToolPlan or None)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        lines = [("tools", tools.prompt_line())] if tools else []
        return render_chat(lines + [(m.role, _family_text(i, m)) for i, m in enumerate(messages)])
    turns = []
    for i, m in enumerate(messages):
        turn = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            turn["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(i, j, c.function.arguments)}}
                for j, c in enumerate(m.tool_calls)]
        for key in ("name", "tool_call_id"):
            if getattr(m, key):
                turn[key] = getattr(m, key)
        turns.append(turn)
    functions = [{"type": "function", "function": f} for f in tools.functions] if tools else None
    try:
        ids = tokenizer.apply_chat_template(turns, tools=functions, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # noqa: BLE001 - a template's own refusal (jinja's raise_exception) or error
        raise invalid(f"The model's chat template refused these messages: {exc}", "messages") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # newer transformers answer a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _family_text(i: int, m) -> str:
    """A message's line in the family's template; an assistant's calls as the list the model writes."""
    text = m.text()
    if m.role != "assistant" or not m.tool_calls:
        return text
    calls = [{"name": c.function.name, "arguments": _arguments(i, j, c.function.arguments)}
             for j, c in enumerate(m.tool_calls)]
    return " ".join(filter(None, [text, json.dumps(calls, ensure_ascii=False)]))


def _arguments(i: int, j: int, text: str) -> dict:
    try:
        arguments = json.loads(text)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise invalid(f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object as text, "
                      f"got {text[:40]!r}.", f"messages[{i}].tool_calls")
    return arguments
