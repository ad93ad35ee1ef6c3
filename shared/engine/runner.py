"""Model runners: one model, many requests, the operations a speculative level needs.

`prefill`, `propose` (k tokens autoregressively, with distributions and confidences),
`score` (one forward over a chunk: the distribution after every chunk token), `rollback`,
`release`, `length`. Every operation is keyed by request id, so a service can run the
same steps for remote callers. `LeanRunner` runs `LeanLlama` on a preallocated cache;
`HFRunner` runs the transformers forward with one `DynamicCache` per request, a batch in
one forward (other architectures, and the reference the lean runner is tested against).

Invariant the callers keep: a request's cache holds every token of its sequence except
the ones the next call feeds (`feeds` / `chunks`), so `length(r)` is the position of the
first fed token. For a request with penalties the runner also keeps the tokens its cache
holds (`penalize` needs every row's prefix), cut with the cache on rollback.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from shared.engine.grammar import JSON_OBJECT, Grammar, TokenTrie, token_bytes
from shared.engine.json_schema import compile_schema
from shared.engine.kv_cache import common_prefix
from shared.engine.regex import compile_regex
from shared.engine.sampling import GREEDY, SamplingParams, choose, penalize, process_rows

GRAMMARS = 32  # response formats (a schema each) whose grammar a runner keeps
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Draft:
    """k (or fewer) tokens proposed for one request, with what produced them."""

    tokens: list[int]
    probs: torch.Tensor  # [len(tokens), V]: the distribution each token was drawn from
    confidence: list[float] = field(default_factory=list)  # probs[j, tokens[j]]


def per_request(value, n: int) -> list:
    """A per-request argument given once for all (`k=4`) or per request (`k=[4, 2]`)."""
    return [value] * n if isinstance(value, (int, float)) else list(value)


class Runner:
    """The operations shared by every runner; subclasses provide the cache and the forward."""

    vocab_size: int
    device: torch.device
    max_len: int
    eos_token_id: int | None = None  # the first of eos_token_ids: the one a finished grammar allows
    eos_token_ids: tuple[int, ...] = ()  # every token that ends a sequence (Llama 3's <|eot_id|> beside <|end_of_text|>)
    prefix_caching = False  # whether `prefill` starts on a head of the prompt the cache already holds
    tokenizer_path: Path | None = None  # the checkpoint folder whose tokenizer a JSON response format reads
    _trie: TokenTrie | None = None
    _grammars: OrderedDict | None = None  # (response_format, json_schema) -> Grammar, most recent last

    def __init__(self, seed: int | None = None) -> None:
        self._sampling: dict[str, SamplingParams] = {}
        self._tokens: dict[str, list[int]] = {}  # what the cache holds, for penalized requests
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.forwards = 0
        self.forward_s = 0.0
        self.forward_tokens = 0
        self.prefix_queried = 0  # prompt tokens prefilled
        self.prefix_hits = 0  # of them, already held by the cache (not run)
        self._cached: dict[str, int] = {}  # per request: its prompt's head the cache held at prefill

    # -- what subclasses implement -------------------------------------------------------
    def _open(self, request_id: str, salt: str) -> None: ...
    def _open_prefix(self, request_id: str, tokens: Sequence[int], salt: str) -> int:
        """Open the request on a cache that may already hold a head of `tokens` (written for
        requests of the same `salt`): how many."""
        self._open(request_id, salt)
        return 0

    def _close(self, request_id: str) -> None: ...
    def length(self, request_id: str) -> int: ...
    def _rollback(self, request_id: str, length: int) -> None: ...
    def _logits(self, request_ids: Sequence[str], chunks: Sequence[Sequence[int]], last_only: bool) -> torch.Tensor: ...

    # -- the operations ----------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, request_ids: Sequence[str], chunks: Sequence[Sequence[int]], last_only: bool) -> torch.Tensor:
        vocab = self.vocab_size
        if max(map(max, filter(None, chunks)), default=-1) >= vocab:  # a padding row of a wider level's table: unreadable here
            chunks = [[t if t < vocab else 0 for t in c] for c in chunks]  # (a drafter's guesses get worse, no more)
        t0 = time.perf_counter()
        out = self._logits(request_ids, chunks, last_only)
        self.forward_s += time.perf_counter() - t0
        self.forwards += 1
        self.forward_tokens += sum(len(c) for c in chunks)
        for rid, chunk in zip(request_ids, chunks):
            if rid in self._tokens:
                self._tokens[rid].extend(chunk)
        return out

    def _probs(self, request_ids: Sequence[str], logits: torch.Tensor, chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Distributions from `_forward`'s logits ([B, V] or [B, T, V]): each request's
        penalties (on its rows' prefixes), then `process_rows`."""
        params = [self._sampling[r] for r in request_ids]
        if any(p.adjusted for p in params):
            logits = logits.float().clone()
            for b, (rid, p) in enumerate(zip(request_ids, params)):
                if not p.adjusted:
                    continue
                held = self._tokens.get(rid, ())
                grammar = self.grammar(p) if p.response_format else None
                if logits.dim() == 2:  # last_only: the row after the whole chunk
                    logits[b] = penalize(logits[b][None], p, held, self.eos_token_ids, grammar)[0]
                else:
                    n = len(chunks[b])
                    logits[b, :n] = penalize(logits[b, :n], p, held, self.eos_token_ids, grammar)
        return process_rows(logits, params)

    def sampling(self, request_id: str) -> SamplingParams:
        return self._sampling[request_id]

    def grammar(self, params: SamplingParams) -> Grammar:
        """The grammar of `params`' response format over this model's vocabulary (its folder's
        tokenizer): made at the first request that asks for it and kept (it memoises masks across
        requests), the last `GRAMMARS` of them."""
        if self._trie is None:
            if self.tokenizer_path is None:
                raise ValueError("a JSON response_format needs the model's tokenizer; this runner was not "
                                 "loaded from a checkpoint folder")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_path))
            self._trie = TokenTrie(token_bytes(tokenizer), self.eos_token_id)
            self._grammars = OrderedDict()
        key = (params.response_format, params.json_schema, params.regex)
        grammar = self._grammars.get(key)
        if grammar is None:
            automaton = compile_schema(params.json_schema) if params.response_format == "json_schema" else \
                compile_regex(params.regex) if params.response_format == "regex" else JSON_OBJECT
            grammar = self._grammars[key] = Grammar(self._trie, automaton)
            if len(self._grammars) > GRAMMARS:
                self._grammars.popitem(last=False)
        self._grammars.move_to_end(key)
        return grammar

    def _start(self, request_id: str, tokens: Sequence[int], sampling: SamplingParams, reuse: bool) -> int:
        """Open the request (on a cached head of `tokens` if `reuse`): how many tokens the cache holds."""
        if len(tokens) == 0:
            raise ValueError("a prompt needs at least one token")
        if reuse:
            cached = self._open_prefix(request_id, tokens, sampling.cache_salt)
            self.prefix_queried += len(tokens)
            self.prefix_hits += cached
        else:
            self._open(request_id, sampling.cache_salt)
            cached = 0
        self._cached[request_id] = cached
        sampling = sampling.starting_at(len(tokens))
        self._sampling[request_id] = sampling
        if sampling.penalized:
            self._tokens[request_id] = list(tokens[:cached])  # `_forward` writes the rest
        else:
            self._tokens.pop(request_id, None)
        return cached

    @torch.inference_mode()
    def prefill(self, request_id: str, tokens: Sequence[int], sampling: SamplingParams = GREEDY) -> torch.Tensor:
        """Start (or restart) a request: write `tokens` (those past the head the cache already
        holds), return the next token's distribution [V]."""
        cached = self._start(request_id, tokens, sampling, reuse=True)
        logits = self._forward([request_id], [list(tokens[cached:])], last_only=True)
        return self._probs([request_id], logits, [tokens])[0]

    @torch.inference_mode()
    def prefill_rows(self, request_id: str, tokens: Sequence[int], sampling: SamplingParams = GREEDY) -> torch.Tensor:
        """`prefill` that returns every position's distribution [len(tokens), V]: row j predicts
        the token after tokens[j], so the rows before the last score the prompt itself (all of
        them are run: no cached head)."""
        self._start(request_id, tokens, sampling, reuse=False)
        logits = self._forward([request_id], [list(tokens)], last_only=False)  # [1, T, V]
        return self._probs([request_id], logits, [tokens])[0]

    def rollback(self, request_id: str, length: int) -> None:
        """Cut the request's cache to its first `length` positions."""
        self._rollback(request_id, length)
        if request_id in self._tokens:
            del self._tokens[request_id][length:]

    @torch.inference_mode()
    def propose(
        self,
        request_ids: Sequence[str],
        feeds: Sequence[Sequence[int]],
        k: int | Sequence[int],
        confidence_threshold: float | Sequence[float] = 0.0,
    ) -> list[Draft]:
        """Draft up to k tokens per request, autoregressively, in lockstep over the batch.

        feeds[r] (>= 1 token) are written first; the last drafted token is not written
        (it is fed by the next call, as every other emitted token). A request stops early
        when a token's confidence (its own probability) is below the threshold; that token
        is dropped. k = 0 drafts nothing and writes nothing.

        Unseeded sampling stops on the top probability instead (known before the draw):
        stopping on the drawn token's own probability would skew the proposed tokens away
        from q, and rejection sampling against q would no longer be exact.
        """
        n = len(request_ids)
        ks, thresholds = per_request(k, n), per_request(confidence_threshold, n)
        tokens: list[list[int]] = [[] for _ in range(n)]
        rows: list[list[torch.Tensor]] = [[] for _ in range(n)]
        confs: list[list[float]] = [[] for _ in range(n)]
        active = [i for i in range(n) if ks[i] > 0]
        chunks = {i: list(feeds[i]) for i in active}
        while active:
            steps = self._draft_step([request_ids[i] for i in active], [chunks[i] for i in active])
            still = []
            for i, (tok, row, conf, score) in zip(active, steps):
                if score < thresholds[i]:
                    continue
                tokens[i].append(tok)
                rows[i].append(row)
                confs[i].append(conf)
                if len(tokens[i]) < ks[i]:
                    chunks[i] = [tok]
                    still.append(i)
            active = still
        empty = torch.empty(0, self.vocab_size, device=self.device)
        return [Draft(t, torch.stack(r) if r else empty, c) for t, r, c in zip(tokens, rows, confs)]

    def _draft_step(self, ids: Sequence[str], chunks: Sequence[Sequence[int]]) -> list[tuple[int, torch.Tensor, float, float]]:
        """Write each chunk and draw the next token: (token, its distribution [V], its
        probability, the score the confidence threshold applies to) per request."""
        params = [self._sampling[r] for r in ids]
        logits = self._forward(ids, chunks, last_only=True)  # [B, V]
        probs = self._probs(ids, logits, chunks)
        picked = self._choose(ids, probs, params)
        conf = probs.gather(-1, picked[:, None]).squeeze(-1).tolist()
        sampled = [not (p.greedy or p.seeded) for p in params]
        top = probs.max(-1).values.tolist() if any(sampled) else conf
        return [(tok, probs[row], conf[row], top[row] if sampled[row] else conf[row])
                for row, tok in enumerate(picked.tolist())]

    def _choose(self, ids: Sequence[str], probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """One token per row of probs [B, V]; each drawn at its request's next position."""
        if all(p.greedy for p in params):
            return torch.argmax(probs, dim=-1)
        out = torch.empty(len(ids), dtype=torch.long, device=probs.device)
        for row, (rid, p) in enumerate(zip(ids, params)):
            out[row] = choose(probs[row : row + 1], p, [self.length(rid)], self.generator)[0]
        return out

    @torch.inference_mode()
    def score(self, request_ids: Sequence[str], chunks: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """One forward over each request's chunk: [len(chunk), V] distributions, row j
        predicting the token after chunk[j] (so the last row is the bonus position)."""
        logits = self._forward(request_ids, chunks, last_only=False)  # [B, T, V]
        probs = self._probs(request_ids, logits, chunks)
        return [probs[b, : len(c)] for b, c in enumerate(chunks)]

    @torch.inference_mode()
    def extend(self, request_id: str, tokens: Sequence[int]) -> None:
        """Write `tokens` after what the request's cache holds, computing no distribution (a
        chunk of a long prompt's prefill)."""
        self._forward([request_id], [list(tokens)], last_only=True)

    def held_prefix(self, tokens: Sequence[int], salt: str = "") -> int:
        """How many tokens of `tokens` a prefill would now find in the cache (0 without prefix caching)."""
        return 0

    def cached_prefix(self, request_id: str) -> int:
        """How many tokens of the request's last prefill the cache already held (prefix caching)."""
        return self._cached.get(request_id, 0)

    def release(self, request_id: str) -> None:
        """Forget a request and free its cache."""
        self._cached.pop(request_id, None)
        self._sampling.pop(request_id, None)
        self._tokens.pop(request_id, None)
        self._close(request_id)


class LeanRunner(Runner):
    """The lean Llama forward on a preallocated, slot-per-request KV cache."""

    def __init__(self, hf_model, device="cpu", dtype=torch.float32, max_batch: int = 16, max_len: int = 512,
                 seed: int | None = None, prefix_caching: bool = False):
        from shared.engine.llama import LeanLlama

        self.device = torch.device(device)
        self.model = LeanLlama(hf_model, self.device, dtype, max_len)
        self.cache = self.model.new_cache(max_batch)
        self.prefix_caching = prefix_caching
        self.max_len = max_len
        self.vocab_size = self.model.vocab_size
        self.eos_token_ids = eos_token_ids(hf_model)
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        super().__init__(seed)

    def _open(self, request_id: str, salt: str) -> None:
        self.cache.open(request_id, salt)

    def _open_prefix(self, request_id: str, tokens: Sequence[int], salt: str) -> int:
        if not self.prefix_caching:
            return super()._open_prefix(request_id, tokens, salt)
        return self.cache.open_prefix(request_id, tokens, salt)

    def _close(self, request_id: str) -> None:
        self.cache.close(request_id)

    def held_prefix(self, tokens: Sequence[int], salt: str = "") -> int:
        return self.cache.held_prefix(tokens, salt) if self.prefix_caching else 0

    def length(self, request_id: str) -> int:
        return self.cache.length(request_id)

    def _rollback(self, request_id: str, length: int) -> None:
        self.cache.rollback(request_id, length)

    def _logits(self, request_ids, chunks, last_only):
        cache = self.cache
        slots = [cache.slot(r) for r in request_ids]
        starts = [cache.length(r) for r in request_ids]
        lengths = [len(c) for c in chunks]
        for r, n in zip(request_ids, lengths):
            cache.check_room(r, n)
        if len(chunks) == 1:
            tokens = torch.tensor([chunks[0]], device=self.device)
        else:
            width = max(lengths)
            tokens = torch.tensor([list(c) + [0] * (width - len(c)) for c in chunks], device=self.device)
        logits = self.model.forward(cache, tokens, slots, starts, lengths, last_only)
        for r, chunk in zip(request_ids, chunks):
            cache.advance(r, chunk)
        return logits


class HFRunner(Runner):
    """The transformers forward, one DynamicCache per request, a batch in one forward.

    A batch of requests runs as transformers runs a left-padded batch: each request's
    cache is padded on the left to the longest, the chunks on the right, a 2-D attention
    mask hides the padding and each row has its own positions. transformers builds the
    causal and sliding-window masks from that, so any architecture it runs batches. The
    keys and values the forward appended go back to each request's own cache.

    Prefix caching (`prefix_caching`), as the lean runner's KV cache does it: each cache
    knows the tokens it holds; a released one is kept (least recently released dropped
    first, live and kept caches together at most `max_batch`), and a prefill starts on the
    longest head of its prompt a cache of the same salt holds: a kept cache holding just
    that head is taken as it is, any other is copied and cut to the head."""

    def __init__(self, hf_model, device="cpu", dtype=torch.float32, max_batch: int = 16, max_len: int = 512,
                 seed: int | None = None, prefix_caching: bool = False):
        self.device = torch.device(device)
        self.model = hf_model.to(device=self.device, dtype=dtype).eval()
        config = hf_model.config
        self.vocab_size = (config.get_text_config() if hasattr(config, "get_text_config") else config).vocab_size
        self.eos_token_ids = eos_token_ids(hf_model)
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.max_batch, self.max_len = max_batch, max_len
        self.prefix_caching = prefix_caching
        self._caches: dict[str, object] = {}
        self._held: dict[str, tuple[list[int], str]] = {}  # per live cache: its tokens and salt
        self._kept: OrderedDict[int, tuple[object, list[int], str]] = OrderedDict()  # released, oldest first
        self._released = 0
        super().__init__(seed)

    def _room(self, request_id: str) -> None:
        if request_id not in self._caches and len(self._caches) >= self.max_batch:
            raise RuntimeError(f"all {self.max_batch} request slots are in use; release a request or raise max_batch")

    def _put(self, request_id: str, cache, tokens: list[int], salt: str) -> None:
        self._caches[request_id] = cache
        self._held[request_id] = (tokens, salt)
        while self._kept and len(self._caches) + len(self._kept) > self.max_batch:
            self._kept.popitem(last=False)

    def _open(self, request_id: str, salt: str = "") -> None:
        from transformers import DynamicCache

        self._room(request_id)
        self._put(request_id, DynamicCache(), [], salt)  # full layers: a sliding window is the mask's, so rollback works

    def _open_prefix(self, request_id: str, tokens: Sequence[int], salt: str) -> int:
        if not self.prefix_caching:
            return super()._open_prefix(request_id, tokens, salt)
        self._room(request_id)
        tokens = list(tokens)
        best, source = self._best_head(tokens, salt, request_id)
        if source is None:
            self._open(request_id, salt)
            return 0
        if source[0] == "kept" and len(self._kept[source[1]][1]) == best:
            cache = self._kept.pop(source[1])[0]  # it holds just the head: taken as it is
        else:
            original = self._kept[source[1]][0] if source[0] == "kept" else self._caches[source[1]]
            cache = copy.deepcopy(original)  # the longer sequence stays whole for its own next turn
            cache.crop(best - cache.get_seq_length())
        self._put(request_id, cache, tokens[:best], salt)
        return best

    def _best_head(self, tokens: list[int], salt: str, exclude: str | None = None) -> tuple[int, tuple | None]:
        """The longest head of `tokens` (< len: the last token runs) a cache of `salt` holds, and whose."""
        best, source, usable = 0, None, len(tokens) - 1
        for key, (cache, held, s) in self._kept.items():
            if s == salt and (n := common_prefix(held, tokens, usable)) > best:
                best, source = n, ("kept", key)
        for rid, (held, s) in self._held.items():
            if rid != exclude and s == salt and (n := common_prefix(held, tokens, usable)) > best:
                best, source = n, ("live", rid)
        return best, source

    def held_prefix(self, tokens: Sequence[int], salt: str = "") -> int:
        return self._best_head(list(tokens), salt)[0] if self.prefix_caching else 0

    def _close(self, request_id: str) -> None:
        cache = self._caches.pop(request_id, None)
        held, salt = self._held.pop(request_id, ([], ""))
        if self.prefix_caching and cache is not None and held:
            self._kept[self._released] = (cache, held, salt)
            self._released += 1

    def _cache(self, request_id: str):
        try:
            return self._caches[request_id]
        except KeyError:
            raise KeyError(f"unknown request {request_id!r}: prefill it first") from None

    def length(self, request_id: str) -> int:
        return self._cache(request_id).get_seq_length()

    def _rollback(self, request_id: str, length: int) -> None:
        current = self.length(request_id)
        if not 0 <= length <= current:
            raise ValueError(f"cannot roll request {request_id!r} back to {length}: it holds {current} positions")
        if length < current:
            self._cache(request_id).crop(length - current)  # transformers 5: a negative count removes tokens
            del self._held[request_id][0][length:]

    def _logits(self, request_ids, chunks, last_only):
        caches = [self._cache(r) for r in request_ids]
        starts = [c.get_seq_length() for c in caches]
        for r, s, chunk in zip(request_ids, starts, chunks):
            if s + len(chunk) > self.max_len:
                raise RuntimeError(f"request {r!r} would grow past max_len={self.max_len}")
        if len(chunks) == 1:
            ids = torch.tensor([list(chunks[0])], device=self.device)
            logits = self.model(input_ids=ids, past_key_values=caches[0], use_cache=True,
                                logits_to_keep=1 if last_only else 0).logits
            out = logits[:, -1] if last_only else logits
        else:
            out = self._batch(request_ids, caches, starts, chunks, last_only)
        for r, chunk in zip(request_ids, chunks):
            self._held[r][0].extend(chunk)
        return out

    def _batch(self, request_ids, caches, starts, chunks, last_only):
        """One forward over requests of different lengths: caches padded on the left to the
        longest, chunks on the right; each request's cache then takes its new keys and values."""
        from transformers import DynamicCache

        B, past, width = len(chunks), max(starts), max(len(c) for c in chunks)
        lengths = [len(c) for c in chunks]
        ids = torch.zeros(B, width, dtype=torch.long)
        mask = torch.zeros(B, past + width, dtype=torch.long)
        for b, (s, chunk) in enumerate(zip(starts, chunks)):
            ids[b, : len(chunk)] = torch.tensor(list(chunk))
            mask[b, past - s : past + len(chunk)] = 1
        positions = torch.tensor(starts)[:, None] + torch.arange(width)[None]
        batch = DynamicCache()
        if past:
            filled = next(c for c, s in zip(caches, starts) if s)
            for li, layer in enumerate(filled.layers):
                keys = [_left_padded(c, li, 0, s, past, layer.keys) for c, s in zip(caches, starts)]
                values = [_left_padded(c, li, 1, s, past, layer.values) for c, s in zip(caches, starts)]
                batch.update(torch.cat(keys), torch.cat(values), li)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), past_key_values=batch, use_cache=True).logits
        for b, (r, s, n) in enumerate(zip(request_ids, starts, lengths)):
            own = [(layer.keys[b : b + 1, :, past - s : past + n].contiguous(), layer.values[b : b + 1, :, past - s : past + n].contiguous())
                   for layer in batch.layers]
            self._caches[r] = DynamicCache(ddp_cache_data=own)
        if last_only:
            return logits[torch.arange(B, device=logits.device), torch.tensor(lengths, device=logits.device) - 1]
        return logits


def _left_padded(cache, layer: int, which: int, length: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """One request's keys (`which` 0) or values (1) of `layer`, zeros on the left up to `width` positions."""
    shape = (1, like.shape[1], width - length, like.shape[3])
    pad = torch.zeros(shape, dtype=like.dtype, device=like.device)
    if not length:
        return pad
    held = cache.layers[layer].keys if which == 0 else cache.layers[layer].values
    return torch.cat([pad, held], dim=2) if width > length else held


def eos_token_ids(hf_model) -> tuple[int, ...]:
    """Every token that ends the model's sequences, as transformers' `generate` stops on
    them: the config's `eos_token_id` (an id or a list) then the generation config's, in
    order, once each. Llama 3.x Instruct lists `<|end_of_text|>`, `<|eom_id|>` and
    `<|eot_id|>`; a chat turn ends with the last."""
    ids: list[int] = []
    for source in (hf_model.config, getattr(hf_model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        for token in eos if isinstance(eos, (list, tuple)) else [eos]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return tuple(ids)


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """`AutoModelForCausalLM.from_pretrained(path)` in eval mode on the CPU, weights in `dtype`
    (RoPE's inverse frequencies stay float32, as transformers keeps them)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def load_runner(
    path: str | Path,
    runner: str = "lean",
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    max_batch: int = 16,
    max_len: int = 512,
    seed: int | None = None,
    prefix_caching: bool = False,
) -> Runner:
    """A runner for the checkpoint at `path`: the lean one when it supports the
    architecture (`runner="lean"`), the transformers one otherwise or when asked.
    `prefix_caching`: a prefill starts on the head of its prompt the cache still holds."""
    from shared.engine.llama import UnsupportedModel

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if runner not in ("lean", "hf"):
        raise ValueError(f"runner must be 'lean' or 'hf', got {runner!r}")
    if torch_dtype != torch.float32 and max_batch > 1:
        import logging

        logging.getLogger(__name__).warning(
            "%s with batches of up to %d: ragged batches in reduced precision are not batch-invariant, so a "
            "request's tokens can differ from the target alone; float32 is exact at any batch", torch_dtype, max_batch)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))  # before any weight
    context = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config,
                      "max_position_embeddings", None)
    if context and max_len > context:  # past the positions it was trained on, its outputs are not to be trusted
        raise ValueError(f"engine.max_len={max_len} is longer than the context of {path} ({context} positions, its "
                         f"max_position_embeddings); set SPECMESH_ENGINE__MAX_LEN to at most {context}")
    model = load_hf_model(path, torch_dtype)  # in the runner's dtype: a bf16 checkpoint never takes fp32's memory
    made = None
    if runner == "lean":
        try:
            made = LeanRunner(model, device, torch_dtype, max_batch, max_len, seed, prefix_caching)
        except UnsupportedModel as exc:
            import logging

            logging.getLogger(__name__).warning("lean runner unavailable for %s (%s); using transformers", path, exc)
    made = made or HFRunner(model, device, torch_dtype, max_batch, max_len, seed, prefix_caching)
    made.tokenizer_path = Path(path)
    return made
