"""Each token's own bytes and text, through its tokenizer (byte-level BPE or not).

The gateway shows log-probabilities token by token with it; the JSON grammar
(`shared.engine.grammar`) walks the vocabulary's bytes.
"""

from __future__ import annotations

from functools import lru_cache


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level BPE map from each byte to the printable character a token piece writes for it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


class TokenText:
    """Each token id's own bytes and text, through the tokenizer (byte-level BPE or not)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._byte_of = {c: b for b, c in byte_level_alphabet().items()}
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.bytes = lru_cache(maxsize=1 << 17)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and token_id not in self._special and all(c in self._byte_of for c in piece):
            return bytes(self._byte_of[c] for c in piece)  # a byte-level piece: one character per byte
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")


@lru_cache(maxsize=4)
def token_text(tokenizer) -> TokenText:
    """The `TokenText` of a tokenizer, made once (its cache of token bytes is kept across requests)."""
    return TokenText(tokenizer)
