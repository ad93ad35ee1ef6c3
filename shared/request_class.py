"""Request classes: the key under which the router keeps acceptance history and assigns chains.

A class is `<domain>-<length>`: the domain is `code` or `prose` from the prompt's text,
the length `short` or `long` from its token count. The gateway and the router both use
`classify`, so a class means the same thing on both sides.
"""

from __future__ import annotations

import re

LONG_PROMPT_TOKENS = 128
_CODE_LINE = re.compile(r"^\s*(def |class |import |from \S+ import |return\b|if .*:$|for .*:$|while .*:$|@\w)|[=(){}\[\]]\s*$|^\s{4,}\S")


def domain(text: str) -> str:
    """`code` when at least a third of the non-empty lines look like Python, else `prose`."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "prose"
    code = sum(1 for line in lines if _CODE_LINE.search(line))
    return "code" if 3 * code >= len(lines) else "prose"


def classify(text: str, prompt_tokens: int) -> str:
    return f"{domain(text)}-{'long' if prompt_tokens >= LONG_PROMPT_TOKENS else 'short'}"


CLASSES = tuple(f"{d}-{n}" for d in ("code", "prose") for n in ("short", "long"))
