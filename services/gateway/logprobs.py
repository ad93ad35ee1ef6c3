"""Log-probabilities in the OpenAI API's two shapes, from the target's `TokenLogprob`s.

- Completions (`logprobs: n`): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`,
  one entry per generated token; `top_logprobs[i]` maps the n likeliest tokens' text to
  their log-probabilities; `text_offset[i]` is where token i's text starts in the completion.
- Chat (`logprobs: true, top_logprobs: n`): `{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal": null}`.
- vLLM's `prompt_logprobs: n` (both APIs): `[null, {"<token id>": {"logprob", "rank",
  "decoded_token"}, ...}, ...]`, one entry per prompt token.

What the numbers are (shared/engine/logprobs.py): the target's distribution of each token,
after temperature, top-k and top-p when sampling; -9999.0 where it gives a token no mass.
A token's text is its own bytes decoded on their own, so a token holding part of a UTF-8
character reads U+FFFD; `bytes` (chat) carries the exact bytes.
"""

from __future__ import annotations

from typing import Sequence

from shared.engine.token_text import TokenText
from shared.messages import TokenLogprob


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


def vllm_prompt_logprobs(text: TokenText, prompt: Sequence[int], logprobs: Sequence[TokenLogprob],
                         top: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token a map of token
    id (as text) -> {"logprob", "rank", "decoded_token"} holding the token itself and the `top`
    likeliest at its position (rank 1 the likeliest)."""
    out: list[dict | None] = [None]
    for token, lp in zip(prompt[1:], logprobs):
        entry = {str(i): {"logprob": v, "rank": r, "decoded_token": text.text(i)}
                 for r, (i, v) in enumerate(zip(lp.top_ids[:top], lp.top_logprobs[:top]), start=1)}
        entry.setdefault(str(token), {"logprob": lp.logprob, "rank": lp.rank or None, "decoded_token": text.text(token)})
        out.append(entry)
    return out
