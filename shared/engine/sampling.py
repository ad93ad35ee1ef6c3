"""Sampling parameters and the one logits -> probabilities transform every level applies.

Greedy, temperature / top-k / top-p, and seeded sampling by position-keyed Gumbel-max
noise: the token at absolute position `pos` of a seeded request is
`argmax(log p + G(seed, pos))`, whichever model, chain, batch or machine computes it.

Before those, `penalize` applies what depends on the tokens before a position, as vLLM
does: `logit_bias`, then the repetition penalty (every token of the prompt and output so
far: positive logits divided by it, negative ones multiplied), the frequency penalty (minus
it times the token's count in the output so far) and the presence penalty (minus it once
for a token in the output so far). Each row is penalized by its own prefix, so the row a
target verifies draft position j with counts the drafts before j: the output stays the
target alone's. `min_tokens` rules the end-of-sequence token and `stop_token_ids` out of
every position before the output holds that many tokens (vLLM's `min_tokens`), and a
`response_format` every token that would take the output out of one JSON object (of a
schema; `shared.engine.grammar`, `shared.engine.json_schema`) or out of a regular
expression's matches (`shared.engine.regex`), row by row the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from shared.engine.grammar import Grammar
from shared.engine.json_schema import compile_schema
from shared.engine.regex import compile_regex
from shared.messages import Sampling

RESPONSE_FORMATS = ("", "json_object", "json_schema", "regex")  # "": free text

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns a model's logits into tokens.

    temperature 0 is greedy (argmax); top_k 0, top_p 1 and min_p 0 disable those filters; a seed
    makes sampling a deterministic function of (seed, prompt, target model). The penalties
    at 0 (1 for the repetition penalty) and an empty `logit_bias` change nothing;
    `output_start` is the position of the first output token, where the presence and
    frequency penalties and `min_tokens` start counting (-1: the prompt's length, set at
    prefill; a request resumed from prompt + output keeps its prompt's).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    output_start: int = -1
    min_tokens: int = 0  # no end of sequence (nor stop token) before the output holds this many tokens
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the output, as the end of sequence does
    response_format: str = ""  # "json_object" / "json_schema": the output is one JSON object (of `json_schema`); "regex"
    json_schema: str = ""  # with response_format "json_schema": the schema, as JSON text (json_schema.compile_schema)
    regex: str = ""  # with response_format "regex": the expression the whole output matches (regex.compile_regex)
    cache_salt: str = ""  # a prompt's head cached for one salt is not reused for another (kv_cache.open_prefix)
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest (after temperature); 0: off
    allowed_token_ids: tuple[int, ...] = ()  # only these may be sampled (vLLM's); empty: every token

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number (0 = off), got {value!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and 0.0 < self.repetition_penalty < math.inf):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), "
                             f"got {self.repetition_penalty!r}")
        for pair in self.logit_bias:
            token, bias = pair if isinstance(pair, tuple) and len(pair) == 2 else (None, None)
            if isinstance(token, bool) or not isinstance(token, int) or token < 0 \
                    or not (isinstance(bias, (int, float)) and math.isfinite(bias)):
                raise ValueError(f"logit_bias entries must be (token id >= 0, finite bias), got {pair!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.allowed_token_ids):
            raise ValueError(f"allowed_token_ids must be token ids >= 0, got {list(self.allowed_token_ids)[:8]!r}")
        if len({t for t, _ in self.logit_bias}) != len(self.logit_bias):
            raise ValueError("logit_bias names a token id more than once")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {list(self.stop_token_ids)!r}")
        if self.response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {', '.join(map(repr, RESPONSE_FORMATS))}, "
                             f"got {self.response_format!r}")
        if self.response_format == "json_schema":
            try:
                compile_schema(self.json_schema)
            except ValueError as exc:
                raise ValueError(f"response_format json_schema: {exc}") from None
        elif self.json_schema:
            raise ValueError("a json_schema needs response_format 'json_schema'")
        if self.response_format == "regex":
            try:
                compile_regex(self.regex)
            except ValueError as exc:
                raise ValueError(f"response_format regex: {exc}") from None
        elif self.regex:
            raise ValueError("a regex needs response_format 'regex'")
        if self.response_format and self.allowed_token_ids:
            raise ValueError("allowed_token_ids cannot be combined with a response_format: the format decides "
                             "which tokens may come")
        if self.response_format and self.min_tokens:
            raise ValueError("min_tokens cannot be combined with a response_format: the end of sequence "
                             "must be free to follow the object (or match)")
        if isinstance(self.output_start, bool) or not isinstance(self.output_start, int) or self.output_start < -1:
            raise ValueError(f"output_start must be a position >= 0 (-1: the prompt's length), "
                             f"got {self.output_start!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def seeded(self) -> bool:
        """Sampling whose randomness is keyed by (seed, position): verified by Gumbel-max."""
        return not self.greedy and self.seed is not None

    @property
    def penalized(self) -> bool:
        """Whether a position's distribution depends on the tokens before it (a penalty, min_tokens
        or a response format is on)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or self.min_tokens > 0 or bool(self.response_format))

    @property
    def adjusted(self) -> bool:
        """Whether `penalize` changes anything."""
        return self.penalized or bool(self.logit_bias) or bool(self.allowed_token_ids)

    def starting_at(self, prompt_len: int) -> SamplingParams:
        """These parameters with the output starting at `prompt_len`, unless already placed
        (or nothing counts the output: equal parameters keep `process_rows` batched)."""
        return self if self.output_start >= 0 or not self.penalized else replace(self, output_start=prompt_len)

    @classmethod
    def from_wire(cls, s: Sampling) -> SamplingParams:
        """From the message that carries them between services (ValueError if out of range)."""
        if len(s.logit_bias_ids) != len(s.logit_bias_values):
            raise ValueError(f"logit_bias needs one value per token id: {len(s.logit_bias_ids)} ids, "
                             f"{len(s.logit_bias_values)} values")
        return cls(s.temperature, s.top_p, s.top_k, s.seed, s.presence_penalty, s.frequency_penalty,
                   s.repetition_penalty, tuple(zip(s.logit_bias_ids, s.logit_bias_values)), s.output_start,
                   s.min_tokens, tuple(s.stop_token_ids), s.response_format, s.json_schema, s.regex, s.cache_salt,
                   s.min_p, tuple(s.allowed_token_ids))

    def to_wire(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.top_k, self.seed, self.presence_penalty,
                        self.frequency_penalty, self.repetition_penalty, [t for t, _ in self.logit_bias],
                        [float(b) for _, b in self.logit_bias], self.output_start, self.min_tokens,
                        list(self.stop_token_ids), self.response_format, self.json_schema, self.regex,
                        self.cache_salt, self.min_p, list(self.allowed_token_ids))


GREEDY = SamplingParams()


def penalize(logits: torch.Tensor, params: SamplingParams, tokens: Sequence[int] = (),
             eos_token_ids: Sequence[int] = (), grammar: Grammar | None = None) -> torch.Tensor:
    """Logits [T, V] (float32, a new tensor) after `allowed_token_ids`, `logit_bias`, the
    penalties, `min_tokens` and the response format (`grammar`: the model vocabulary's,
    needed for one).

    The rows are the last T positions of `tokens` (the request's sequence so far): row j
    predicts the token after `tokens[len(tokens) - T + j]` and is penalized by the tokens up
    to and including that one. `tokens` is needed only when `params.penalized`; tokens at
    positions from `params.output_start` on are the output. `min_tokens` rules out the
    model's `eos_token_ids` (every token that ends its sequences) and `params.stop_token_ids`. The response format leaves
    each row predicting an output token only the tokens its grammar allows after that
    row's output so far.
    """
    x = logits.float().clone()
    rows, vocab = x.shape
    if params.allowed_token_ids:
        inside = [t for t in params.allowed_token_ids if t < vocab]
        if not inside:
            raise ValueError(f"allowed_token_ids holds no token of this model's vocabulary of {vocab}")
        barred = torch.ones(vocab, dtype=torch.bool, device=x.device)
        barred[torch.tensor(inside, dtype=torch.long, device=x.device)] = False
        x.masked_fill_(barred, float("-inf"))
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long)
        bias = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)
        inside = ids < vocab
        x[:, ids[inside]] += bias[inside].to(x.device)
    if not params.penalized:
        return x
    if len(tokens) < rows:
        raise ValueError(f"{rows} rows need at least {rows} tokens of context, got {len(tokens)}")
    seq = np.asarray(tokens, dtype=np.int64)  # the bookkeeping in numpy: small arrays, cheap calls
    base = len(seq) - rows  # row 0's prefix is seq[: base + 1]
    start = max(params.output_start, 0)
    ends = [t for t in (*eos_token_ids, *params.stop_token_ids) if t < vocab]
    if params.min_tokens and ends:
        emitted = np.arange(base + 1, len(seq) + 1) - start  # output tokens before each row's prediction
        early = torch.from_numpy(np.flatnonzero(emitted < params.min_tokens)).to(x.device)
        x[early[:, None], torch.tensor(ends, device=x.device)[None]] = float("-inf")
    if params.response_format:
        _constrain(x, params, seq, base, start, grammar)
    if not (params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0):
        return x
    # Only the tokens the sequence holds are penalized: work on those columns alone.
    cols, column = np.unique(seq, return_inverse=True)  # its distinct tokens, and each position's
    width = len(cols)
    step = np.zeros((rows, width), dtype=np.float32)
    step[np.arange(rows), column[base:]] = 1.0  # what each row's prefix adds to the one before
    seen = np.bincount(column[:base], minlength=width)[None] + step.cumsum(0)
    out_step = step * (np.arange(base, len(seq)) >= start)[:, None]
    counts = np.bincount(column[min(start, base):base], minlength=width)[None] + out_step.cumsum(0)
    inside = cols < vocab
    cols = cols[inside]
    seen = seen[:, inside] > 0
    counts = np.ascontiguousarray(counts[:, inside], dtype=np.float32)
    if x.device.type == "cpu":  # numpy: on these few columns it costs less than torch's calls
        x.numpy()[:, cols] = _penalized(x.numpy()[:, cols], seen, counts, params, np)
    else:
        index = torch.from_numpy(cols).to(x.device)
        x[:, index] = _penalized(x[:, index], torch.from_numpy(seen).to(x.device),
                                 torch.from_numpy(counts).to(x.device), params, torch)
    return x


def _constrain(x: torch.Tensor, params: SamplingParams, seq: np.ndarray, base: int, start: int,
               grammar: Grammar | None) -> None:
    """-inf, in place, on what the response format rules out at each row that predicts an
    output token (row j predicts position base + j + 1; the prompt's rows are left as they are)."""
    if grammar is None:
        raise ValueError(f"response_format {params.response_format!r} needs the model's tokenizer, and this "
                         f"runner has none")
    rows, vocab = x.shape
    masks = [(j, grammar.allowed(grammar.state(seq[start:base + j + 1].tolist()), vocab))
             for j in range(rows) if base + j + 1 >= start]
    if masks:
        index = torch.tensor([j for j, _ in masks], device=x.device)
        blocked = torch.from_numpy(~np.stack([m for _, m in masks])).to(x.device)
        x[index] = x[index].masked_fill(blocked, float("-inf"))


def _penalized(xs, seen, counts, params: SamplingParams, lib):
    """The penalties on the columns of the tokens a sequence holds ([T, n] float32 numpy
    arrays or torch tensors; `lib` is their module): the same float32 steps in both."""
    if params.repetition_penalty != 1.0:
        r = params.repetition_penalty
        xs = lib.where(seen, lib.where(xs > 0, xs / r, xs * r), xs)
    if params.frequency_penalty:
        xs = xs - params.frequency_penalty * counts
    if params.presence_penalty:
        xs = xs - params.presence_penalty * lib.sign(counts)
    return xs


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [..., V] (float32) from logits [..., V]: temperature, min-p, top-k, top-p,
    softmax (vLLM's order: min-p is measured on the whole tempered distribution).

    Greedy requests get the plain softmax (temperature 1): its argmax is the greedy token
    and its value there is the draft's confidence.
    """
    x = logits.float()
    if params.greedy:
        return torch.softmax(x, dim=-1)
    if params.temperature != 1.0:
        x = x / params.temperature
    vocab = x.shape[-1]
    if params.min_p > 0.0:  # p < min_p * p_max, as log p - log p_max < log min_p: no softmax needed
        top = x.max(dim=-1, keepdim=True).values
        x = x.masked_fill(x - top < math.log(params.min_p), float("-inf"))
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly above each token
        drop_sorted = before >= params.top_p  # keeps the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return torch.softmax(x, dim=-1)


def process_rows(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """`process_logits` on a batch [B, ..., V] whose rows may carry different parameters."""
    first = params[0]
    if all(_filters(p) == _filters(first) for p in params):
        return process_logits(logits, first)  # what the transform reads is the same for every row
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for row, p in enumerate(params):
        out[row] = process_logits(logits[row], p)
    return out


def _filters(p: SamplingParams) -> tuple:
    """What `process_logits` reads of a request's parameters."""
    return p.temperature, p.top_p, p.top_k, p.min_p


def _mix(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): independent 63-bit generator seeds per position."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def gumbel_noise(seed: int, positions: Sequence[int], vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gumbel(0, 1) noise [len(positions), V] that depends only on (seed, absolute position).

    Drawn on the CPU so every device and every level sees bit-identical noise.
    """
    out = torch.empty(len(positions), vocab_size, dtype=torch.float32)
    gen = torch.Generator()
    for row, pos in enumerate(positions):
        gen.manual_seed(_mix(seed, int(pos)))
        out[row].uniform_(generator=gen)
    out.clamp_(min=1e-20).log_().neg_().clamp_(min=1e-20).log_().neg_()
    return out.to(device)


def gumbel_argmax(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`argmax(log p + G)` along the last axis: one exact sample from each row of `probs`."""
    return torch.argmax(torch.log(probs) + noise.to(probs.device), dim=-1)


def choose(probs: torch.Tensor, params: SamplingParams, positions: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` [n, V] at the given absolute positions, as `params` says."""
    if params.greedy:
        return torch.argmax(probs, dim=-1)
    if params.seeded:
        return gumbel_argmax(probs, gumbel_noise(params.seed, positions, probs.shape[-1]))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
