"""Constrained decoding: the tokens that keep a request's output a prefix of one JSON object.

`response_format: {"type": "json_object"}` (OpenAI's JSON mode) makes every output one
JSON object (RFC 8259, UTF-8) followed by the end of sequence. Like the penalties, the
constraint is a function of a row's own prefix (`sampling.penalize` applies it to every
row a level scores), so a chain still emits exactly what the target alone emits under it.

A byte-level pushdown automaton (`step`) says which bytes may follow an output so far; a
trie of the vocabulary's token bytes (`TokenTrie`, `Grammar`) turns an automaton state into the
tokens whose bytes all fit, walking each shared prefix once and cutting a subtree at its
first wrong byte. Masks are memoised per state (the body of a key at one nesting, a value
position...) and states per output, so a request pays for a state the first time any
request reaches it. The object starts at the first byte; between JSON's tokens the
whitespace is a single space, or a newline and up to `MAX_INDENT` spaces or tabs (what
`json.dumps` writes, compact or indented): a model that finds whitespace likely would
otherwise write little else until max_tokens (vLLM's xgrammar users met it as
`disable_any_whitespace`). Nesting is at most `MAX_DEPTH` deep; once the object is closed
only the end of sequence may follow.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

MAX_DEPTH = 32  # most objects and arrays open at once
MAX_INDENT = 16  # most spaces or tabs after a newline between JSON's tokens (eight levels of two)
STATE_CACHE = 1 << 12  # outputs whose state is kept (the least recently used go first)
MASK_BYTES = 64 << 20  # the token masks a grammar keeps, one byte per token each (at least 64 masks)

# Modes of the automaton. A state is (mode, stack, aux): stack holds "o" (object) and "a"
# (array) for each open container, innermost last; aux is what the mode needs (between
# tokens of JSON: the whitespace since the last one, `after_whitespace`'s run; None for none).
START, VALUE, FIRST_ITEM, FIRST_KEY, KEY, COLON, AFTER, STRING, ESCAPE, UNICODE, NUMBER, LITERAL, DONE = range(13)
# Number sub-states (aux of NUMBER): after "-", after a leading "0", in the integer digits,
# after ".", in the fraction, after "e", after the exponent's sign, in the exponent.
MINUS, ZERO, INT, DOT, FRAC, EXP_MARK, EXP_SIGN, EXP = range(8)
NUMBER_ENDS = (ZERO, INT, FRAC, EXP)  # where a number may end

WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
INITIAL = (START, "", None)
# UTF-8 (RFC 3629): lead byte -> (continuation bytes, the range of the first: no overlong
# forms, no surrogates, nothing past U+10FFFF); the others are 0x80-0xBF.
UTF8_LEADS = {b: (1, 0x80, 0xBF) for b in range(0xC2, 0xE0)} | {b: (2, 0x80, 0xBF) for b in range(0xE1, 0xF0)} \
    | {0xE0: (2, 0xA0, 0xBF), 0xED: (2, 0x80, 0x9F), 0xF0: (3, 0x90, 0xBF), 0xF4: (3, 0x80, 0x8F)} \
    | {b: (3, 0x80, 0xBF) for b in range(0xF1, 0xF4)}


def after_whitespace(run: int, b: int) -> int | None:
    """The whitespace run between two of JSON's tokens after byte `b`, None if refused: 0
    none yet, -1 a space (nothing may follow it), n > 0 a newline and n - 1 spaces or tabs."""
    if run == 0:
        return -1 if b == 0x20 else 1 if b == 0x0A else None
    if run > 0 and b in (0x20, 0x09) and run <= MAX_INDENT:
        return run + 1
    return None


def _after_value(stack: str) -> tuple:
    return (DONE, "", None) if not stack else (AFTER, stack, None)


def value_start(stack: str, b: int) -> tuple | None:
    """The state after `b` opens a value."""
    if b == 0x7B:  # {
        return (FIRST_KEY, stack + "o", None) if len(stack) < MAX_DEPTH else None
    if b == 0x5B:  # [
        return (FIRST_ITEM, stack + "a", None) if len(stack) < MAX_DEPTH else None
    if b == 0x22:  # "
        return (STRING, stack, (False, 0))
    if b == 0x2D:  # -
        return (NUMBER, stack, MINUS)
    if b == 0x30:
        return (NUMBER, stack, ZERO)
    if b in DIGITS:
        return (NUMBER, stack, INT)
    rest = LITERALS.get(b)
    return (LITERAL, stack, rest) if rest else None


def _number(stack: str, sub: int, b: int) -> tuple | None:
    if b in DIGITS:
        if sub in (MINUS, INT):
            return (NUMBER, stack, INT if sub == INT or b != 0x30 else ZERO)
        if sub in (DOT, FRAC):
            return (NUMBER, stack, FRAC)
        if sub in (EXP_MARK, EXP_SIGN, EXP):
            return (NUMBER, stack, EXP)
        return None  # a leading zero takes no digit after it
    if b == 0x2E and sub in (ZERO, INT):  # .
        return (NUMBER, stack, DOT)
    if b in (0x65, 0x45) and sub in (ZERO, INT, FRAC):  # e E
        return (NUMBER, stack, EXP_MARK)
    if b in (0x2B, 0x2D) and sub == EXP_MARK:  # + -
        return (NUMBER, stack, EXP_SIGN)
    if sub in NUMBER_ENDS:  # the number ends here; the byte belongs to what follows it
        return step(_after_value(stack), b)
    return None


def _string(stack: str, aux: tuple, b: int) -> tuple | None:
    """aux: (is_key, 0) between characters; (is_key, bytes left, range of the next) inside one."""
    is_key, continuation = aux[0], aux[1]
    if continuation:  # inside a multi-byte UTF-8 character
        if not aux[2] <= b <= aux[3]:
            return None
        return (STRING, stack, (is_key, continuation - 1, 0x80, 0xBF) if continuation > 1 else (is_key, 0))
    if b == 0x22:
        return (COLON, stack, None) if is_key else _after_value(stack)
    if b == 0x5C:  # backslash
        return (ESCAPE, stack, is_key)
    if b < 0x20:
        return None  # control characters must be escaped
    if b < 0x80:
        return (STRING, stack, aux)
    lead = UTF8_LEADS.get(b)
    return None if lead is None else (STRING, stack, (is_key, *lead))


def step(state: tuple, b: int) -> tuple | None:
    """The state after byte `b`, or None if no JSON object's text continues that way."""
    mode, stack, aux = state
    if mode == STRING:
        return _string(stack, aux, b)
    if mode == NUMBER:
        return _number(stack, aux, b)
    if mode == LITERAL:
        if b != aux[0]:
            return None
        return (LITERAL, stack, aux[1:]) if len(aux) > 1 else _after_value(stack)
    if mode == ESCAPE:
        if b in ESCAPES:
            return (STRING, stack, (aux, 0))
        return (UNICODE, stack, (aux, 4)) if b == 0x75 else None  # \uXXXX
    if mode == UNICODE:
        if b not in HEX:
            return None
        is_key, left = aux
        return (UNICODE, stack, (is_key, left - 1)) if left > 1 else (STRING, stack, (is_key, 0))
    if mode == DONE:
        return None
    if mode == START:
        return (FIRST_KEY, "o", None) if b == 0x7B else None
    if b in WHITESPACE:
        run = after_whitespace(aux or 0, b)
        return None if run is None else (mode, stack, run)
    if mode == VALUE:
        return value_start(stack, b)
    if mode == FIRST_ITEM:
        return _after_value(stack[:-1]) if b == 0x5D else value_start(stack, b)
    if mode in (FIRST_KEY, KEY):
        if b == 0x22:
            return (STRING, stack, (True, 0))
        return _after_value(stack[:-1]) if mode == FIRST_KEY and b == 0x7D else None
    if mode == COLON:
        return (VALUE, stack, None) if b == 0x3A else None
    # AFTER a value inside a container
    inner = stack[-1]
    if b == 0x2C:  # ,
        return (KEY if inner == "o" else VALUE, stack, None)
    if (b == 0x7D and inner == "o") or (b == 0x5D and inner == "a"):
        return _after_value(stack[:-1])
    return None


def advance(state: tuple | None, data: bytes, step=step) -> tuple | None:
    """The state after every byte of `data` under `step` (None once one does not fit)."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


class JsonObject:
    """The automaton of one JSON object (`response_format` json_object)."""

    initial = INITIAL
    step = staticmethod(step)

    @staticmethod
    def done(state: tuple) -> bool:
        return state[0] == DONE


JSON_OBJECT = JsonObject()


class _Node:
    __slots__ = ("children", "ids")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.ids: list[int] = []


class TokenTrie:
    """A vocabulary's token bytes as a trie. `token_bytes[i]` is token i's bytes (empty for
    special tokens, which never fit a grammar); `eos_token_id` ends a finished output."""

    def __init__(self, token_bytes: Sequence[bytes], eos_token_id: int | None):
        if eos_token_id is None:
            raise ValueError("a JSON response_format needs a model with an end-of-sequence token")
        self.vocab_size = len(token_bytes)
        self.eos_token_id = eos_token_id
        self.token_bytes = list(token_bytes)
        self.root = _Node()
        for token, data in enumerate(self.token_bytes):
            if not data or token == eos_token_id:
                continue
            node = self.root
            for b in data:
                node = node.children.setdefault(b, _Node())
            node.ids.append(token)


class Grammar:
    """An automaton (`initial`, `step(state, byte)`, `done(state)`) over a vocabulary:
    `allowed(state(output), width)` is the tokens that may follow `output`."""

    def __init__(self, trie: TokenTrie, automaton=JSON_OBJECT):
        self.trie, self.automaton = trie, automaton
        self._states: OrderedDict[tuple[int, ...], tuple | None] = OrderedDict()
        self._masks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._mask_limit = max(64, MASK_BYTES // max(trie.vocab_size, 1))

    def state(self, output: Sequence[int]) -> tuple | None:
        """The automaton's state after `output` (token ids), None if it left the grammar."""
        key = tuple(output)
        found = self._states.get(key)
        if found is not None or key in self._states:
            self._states.move_to_end(key)
            return found
        start = len(key)
        while start > 0 and key[:start] not in self._states:  # the longest output already known
            start -= 1
            if len(key) - start > 64:  # a long miss (a resumed request): compute it whole
                start = 0
                break
        state = self._states[key[:start]] if start else self.automaton.initial
        trie, step = self.trie, self.automaton.step
        for i in range(start, len(key)):
            token = key[i]
            state = advance(state, trie.token_bytes[token], step) if token < trie.vocab_size else None
            self._remember(key[:i + 1], state)
        if not key:
            self._remember(key, state)
        return state

    def _remember(self, key: tuple[int, ...], state: tuple | None) -> None:
        self._states[key] = state
        self._states.move_to_end(key)
        if len(self._states) > STATE_CACHE:
            self._states.popitem(last=False)

    def allowed(self, state: tuple | None, width: int) -> np.ndarray:
        """Booleans [width]: the tokens whose bytes all fit after `state`, and the end of
        sequence where the output is complete (`done`). An output that left the grammar (a
        draft not verified under it) may only end."""
        vocab, eos = self.trie.vocab_size, self.trie.eos_token_id
        mask = self._masks.get(state) if state is not None else None
        if mask is None:
            mask = np.zeros(vocab, dtype=bool)
            if state is None:
                mask[eos] = True
            else:
                self._walk(state, mask)  # nothing after a closed JSON object; a regex's match may go on
                if self.automaton.done(state) or not mask.any():  # (a vocabulary that cannot go on: end, not fail)
                    mask[eos] = True
            if state is not None:
                self._masks[state] = mask
                if len(self._masks) > self._mask_limit:
                    self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(state)
        if width == vocab:
            return mask
        out = np.zeros(width, dtype=bool)
        n = min(width, vocab)
        out[:n] = mask[:n]
        return out

    def _walk(self, state: tuple, mask: np.ndarray) -> None:
        step = self.automaton.step
        pending = [(self.trie.root, state)]
        while pending:
            node, at = pending.pop()
            for b, child in node.children.items():
                nxt = step(at, b)
                if nxt is None:
                    continue
                if child.ids:
                    mask[child.ids] = True
                if child.children:
                    pending.append((child, nxt))


def token_bytes(tokenizer) -> list[bytes]:
    """Each token id's bytes through `tokenizer` (`TokenText`), empty for its special tokens."""
    from shared.engine.token_text import TokenText

    text = TokenText(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [b"" if i in special else text.bytes(i) for i in range(len(tokenizer))]
