"""A reasoning model's thinking, apart from its answer (`gateway.reasoning_parser` "think";
vLLM's `--reasoning-parser` for models that think between `<think>` and `</think>`, as
DeepSeek-R1 and Qwen3 do).

The output thinks when it starts with `<think>` (Qwen3 writes it), or when the prompt ends
with it (DeepSeek-R1's template opens it); the thinking runs to the first `</think>` (to the
end, if the output is cut first), and the answer is what follows. Chat answers carry it as
`message.reasoning_content` (streamed: `delta.reasoning_content`), the Responses API as a
`reasoning` output item. Tool calls and the answer's text are read from the answer only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.gateway.generation import Delta

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Thinking:
    """How one request's output is split: `opened` when its prompt ends inside `<think>`."""

    opened: bool = False

    @classmethod
    def after(cls, prompt_text: str) -> Thinking:
        return cls(prompt_text.rstrip().endswith(OPEN))

    def split(self, text: str) -> tuple[str | None, str]:
        """(the thinking, None if there is none; the answer)."""
        if not self.opened:
            stripped = text.lstrip()
            if not stripped.startswith(OPEN):
                return None, text
            text = stripped[len(OPEN):]
        reasoning, _, answer = text.partition(CLOSE)
        return reasoning, answer


@dataclass
class ThinkingStream:
    """One streamed choice: each delta's text as ("reasoning" | "content", Delta) parts. A tag
    split across deltas waits for the next one; a part carries the token ids (and their
    log-probabilities) of every delta fed since the last part."""

    thinking: Thinking
    phase: str = ""  # "start" (not known yet), "reasoning", "content"
    text: str = ""  # the output so far
    sent: int = 0  # characters of it sent (or skipped: a tag)
    ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.phase = "reasoning" if self.thinking.opened else "start"

    def feed(self, delta) -> list[tuple[str, Delta]]:
        if self.phase == "content" and not self.ids:
            return [("content", delta)]
        self.text += delta.text
        self.ids += delta.token_ids
        self.logprobs += delta.logprobs
        out: list[tuple[str, str]] = []
        if self.phase == "start":
            head = self.text.lstrip()
            if len(head) < len(OPEN) and OPEN.startswith(head):
                return []  # nothing yet, or the start of the tag
            if head.startswith(OPEN):
                self.phase, self.sent = "reasoning", len(self.text) - len(head) + len(OPEN)
            else:
                self.phase = "content"
        if self.phase == "reasoning":
            rest = self.text[self.sent:]
            if CLOSE in rest:
                reasoning, _, answer = rest.partition(CLOSE)
                out += [("reasoning", reasoning), ("content", answer)]
                self.phase, self.sent = "content", len(self.text)
            else:
                keep = next((n for n in range(len(CLOSE) - 1, 0, -1) if rest.endswith(CLOSE[:n])), 0)
                out.append(("reasoning", rest[:len(rest) - keep]))
                self.sent += len(rest) - keep
        elif self.phase == "content":
            out.append(("content", self.text[self.sent:]))
            self.sent = len(self.text)
        return self._parts(out)

    def finish(self) -> list[tuple[str, Delta]]:
        """What is still held when the output ends."""
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        return self._parts([("content" if self.phase == "start" else self.phase, rest)]) if rest or self.ids else []

    def _parts(self, parts: list[tuple[str, str]]) -> list[tuple[str, Delta]]:
        parts = [(kind, text) for kind, text in parts if text] or parts[-1:]
        if not parts:
            return []
        out = [(kind, Delta(text, [])) for kind, text in parts]
        out[-1] = (out[-1][0], Delta(out[-1][1].text, self.ids, self.logprobs))  # the ids go with the last part
        self.ids, self.logprobs = [], []
        return out
