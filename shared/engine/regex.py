"""A regular expression as a byte automaton: `response_format` "regex" (vLLM's `guided_regex`,
and `guided_choice` as the alternation of its strings).

The whole output must match the expression (full match, as vLLM's); the end of sequence is
allowed wherever a match ends, and bytes go on while a match can still end further on.
Characters are matched through interegular's automata (`json_schema.Pattern`, at most 4096
states), UTF-8 byte by byte: a lead byte is taken only if some character it starts can
continue a match, so a mask never leaves an output with nothing to write. Lookarounds and
back-references are refused (interegular's error, as a ValueError).
"""

from __future__ import annotations

from functools import lru_cache

from shared.engine.grammar import UTF8_LEADS
from shared.engine.json_schema import Pattern, _code_points

MAX_REGEX_CHARS = 4096  # the longest expression a request may send
SPECIAL = frozenset("\\.^$*+?()[]{}|/-&~")  # characters escaped in a choice (interegular's syntax)


class RegexAutomaton:
    """`initial`, `step(state, byte)`, `done(state)` over a full match of one expression. A state
    is (the pattern's state, the bytes of a character begun, its bytes left, the next one's range)."""

    def __init__(self, regex: str):
        self.pattern = Pattern(regex, "regex", shown=regex)
        self.initial = (self.pattern.initial, b"", 0, 0, 0)

    def done(self, state: tuple) -> bool:
        """Whether the output so far is a match (the end of sequence may come)."""
        return not state[2] and state[0] in self.pattern.finals

    def step(self, state: tuple, b: int) -> tuple | None:
        match, begun, left, low, high = state
        pattern = self.pattern
        if left:  # inside a multi-byte character
            if not low <= b <= high:
                return None
            begun += bytes([b])
            if left == 1:
                nxt = pattern.step(match, begun.decode())
                return None if nxt is None else (nxt, b"", 0, 0, 0)
            if not pattern.any_in(match, *_code_points(begun, 0x80, 0xBF, left - 2)):
                return None
            return (match, begun, left - 1, 0x80, 0xBF)
        if b < 0x80:
            nxt = pattern.step(match, chr(b))
            return None if nxt is None else (nxt, b"", 0, 0, 0)
        lead = UTF8_LEADS.get(b)
        if lead is None or not pattern.any_in(match, *_code_points(bytes([b]), lead[1], lead[2], lead[0] - 1)):
            return None
        return (match, bytes([b]), lead[0], lead[1], lead[2])


def choice_regex(choices: list[str]) -> str:
    """The expression whose matches are exactly `choices` (each escaped)."""
    return "|".join("(" + "".join("\\" + c if c in SPECIAL else c for c in choice) + ")" for choice in choices)


@lru_cache(maxsize=64)
def compile_regex(regex: str) -> RegexAutomaton:
    """The automaton of `regex`, made once per expression (ValueError if refused)."""
    if not isinstance(regex, str) or not regex:
        raise ValueError("the regex is empty")
    if len(regex) > MAX_REGEX_CHARS:
        raise ValueError(f"the regex is longer than {MAX_REGEX_CHARS} characters")
    try:
        return RegexAutomaton(regex)
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("regex: ")) from None
