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
from dataclasses import dataclass, field

from services.gateway.generation import invalid

ROLES = {"tools": "Tools", "system": "System", "developer": "System", "user": "User", "assistant": "Assistant",
         "tool": "Tool"}
CUE = "Assistant:"


def render_chat(messages: Sequence[tuple[str, str]], cue: bool = True) -> str:
    """The family's template: `Role: content` per message, one per line, then `Assistant:`
    (unless `cue` is false).

    >>> render_chat([("system", "Be brief."), ("user", "Hi")])
    'System: Be brief.\\nUser: Hi\\nAssistant:'
    """
    lines = [f"{ROLES[role]}: {content}" for role, content in messages]
    return "\n".join([*lines, CUE] if cue else lines)


@dataclass(frozen=True)
class Rendering:
    """vLLM's chat extensions: how the messages end the prompt."""

    add_generation_prompt: bool = True  # the assistant's cue after the messages
    continue_final_message: bool = False  # the last (assistant) message left open, to be continued
    template_kwargs: dict = field(default_factory=dict)  # passed to the checkpoint's template (e.g. enable_thinking)

    def check(self, messages) -> None:
        if self.add_generation_prompt and self.continue_final_message:
            raise invalid("continue_final_message needs add_generation_prompt: false (the last message is "
                          "continued, no new one is cued).", "continue_final_message")
        if self.continue_final_message and messages[-1].role != "assistant":
            raise invalid("continue_final_message needs an assistant message last.", "continue_final_message")
        taken = sorted(set(self.template_kwargs) & RESERVED)
        if taken:
            raise invalid(f"chat_template_kwargs may not set {taken[0]!r} (a field of the request).",
                          "chat_template_kwargs")


RESERVED = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                      "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                      "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


def chat_prompt(tokenizer, messages, tools=None, rendering: Rendering = Rendering()) -> str | list[int]:
    """The prompt of a chat request's `messages` (ChatMessage models) and `tools` (a ToolPlan or None)."""
    rendering.check(messages)
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        lines = [("tools", tools.prompt_line())] if tools else []
        return render_chat(lines + [(m.role, _family_text(i, m)) for i, m in enumerate(messages)],
                           cue=rendering.add_generation_prompt)
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
        ids = tokenizer.apply_chat_template(turns, tools=functions, add_generation_prompt=rendering.add_generation_prompt,
                                            continue_final_message=rendering.continue_final_message, tokenize=True,
                                            **rendering.template_kwargs)
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
