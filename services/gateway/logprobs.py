"""Log-probabilities in the OpenAI API's two shapes, from the target's `TokenLogprob`s.

- Completions (`logprobs: n`): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`,
  one entry per generated token; `top_logprobs[i]` maps the n likeliest tokens' text to
  their log-probabilities; `text_offset[i]` is where token i's text starts in the completion.
- Chat (`logprobs: true, top_logprobs: n`): `{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal": null}`.

What the numbers are (shared/engine/logprobs.py): the target's distribution of each token,
after temperature, top-k and top-p when sampling; -9999.0 where it gives a token no mass.
A token's text is its own bytes decoded on their own, so a token holding part of a UTF-8
character reads U+FFFD; `bytes` (chat) carries the exact bytes.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from shared.messages import TokenLogprob


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


def completion_logprobs(text: TokenText, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob],
                        offset: int = 0) -> dict:
    """The completions API's `logprobs` object; `offset`: the text before these tokens (streaming)."""
    tokens, offsets = [], []
    for token in token_ids:
        offsets.append(offset)
        tokens.append(text.text(token))
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{text.text(i): v for i, v in zip(lp.top_ids, lp.top_logprobs)} for lp in logprobs],
        "text_offset": offsets,
    }


def chat_logprobs(text: TokenText, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> dict:
    """The chat API's `logprobs` object."""

    def entry(token: int, value: float) -> dict:
        return {"token": text.text(token), "logprob": value, "bytes": list(text.bytes(token))}

    return {"content": [entry(t, lp.logprob) | {"top_logprobs": [entry(i, v) for i, v in zip(lp.top_ids, lp.top_logprobs)]}
                        for t, lp in zip(token_ids, logprobs)],
            "refusal": None}
