"""A chain of levels (bottom first, target last) driving lossless speculative decoding.

Level 0 proposes (a model drafting autoregressively, or n-gram lookup). Every level above
it produces tokens the same way, recursively: ask the level below for up to k tokens,
score them in one forward, verify them against its own distribution (`shared.engine.verify`)
and keep the accepted prefix plus one recovered or bonus token; a middle level repeats that
until it holds k tokens for the level above. The target's verification is always exact, so
the output is the target's own (token for token under greedy and seeded sampling,
in distribution otherwise). After every verification each cache at or below the verifying
level is rolled back to the longest prefix still valid: O(1) length moves, no copies.

    chain = Chain([("drafter", drafter), ("target", target)], k=4)
    outputs = chain.generate([prompt_ids], max_tokens=32)
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

from shared.engine.depth import DepthPolicy, synchronize
from shared.engine.logprobs import MAX_TOP_LOGPROBS, TokenLogprob, logprobs_of
from shared.engine.ngram import NgramProposer
from shared.engine.runner import Draft, Runner
from shared.engine.sampling import GREEDY, SamplingParams, choose
from shared.engine.stats import ChainStats, LevelStats
from shared.engine.verify import verify

Proposer = Union[Runner, NgramProposer]


@dataclass
class Request:
    """One generation in flight: its tokens so far and its speculation settings."""

    request_id: str
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = GREEDY
    k: list[int] = field(default_factory=list)  # k[i]: tokens level i proposes per verification
    confidence_threshold: float = 0.0
    stop_at_eos: bool = True
    adaptive_depth: bool = False  # the chain's depth policy may verify fewer than k[-1] drafts a step
    output: list[int] = field(default_factory=list)
    done: bool = False
    stopped: bool = False  # ended by the end-of-sequence token or a stop token (not by max_tokens)
    logprobs: int = -1  # -1: none; n >= 0: each output token's log-probability and the n likeliest
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token when asked
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1.. (the first has none), when asked
    cached_prompt: int = 0  # the prompt's head the target's cache already held (prefix caching)
    stats: dict[str, LevelStats] = field(default_factory=dict)  # this request's share, per proposing level
    depths: list[int] = field(default_factory=list)  # rounds by the drafts the depth policy allowed (index = drafts)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclass
class Level:
    """One rung of a chain."""

    name: str
    proposer: Proposer
    stats: LevelStats

    @property
    def runner(self) -> Runner | None:
        return self.proposer if isinstance(self.proposer, Runner) else None


class Chain:
    """Drives any number of levels over a batch of requests, in lockstep rounds."""

    def __init__(
        self,
        levels: Sequence[tuple[str, Proposer]],
        k: int | Sequence[int] = 4,
        confidence_threshold: float = 0.0,
        leniency: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        depth: DepthPolicy | None = None,
    ) -> None:
        if not levels:
            raise ValueError("a chain needs at least its target")
        if not isinstance(levels[-1][1], Runner):
            raise ValueError("the last level of a chain (the target) must be a model")
        if any(isinstance(p, NgramProposer) for _, p in levels[1:]):
            raise ValueError("an n-gram proposer can only be the bottom level of a chain")
        if len({id(p) for _, p in levels}) != len(levels):
            raise ValueError("each level of a chain needs its own runner")
        # One tokenizer for every level (the family checks it); their embedding tables may be
        # padded to different sizes (verify.py compares distributions over the wider one).
        if leniency < 1.0:
            raise ValueError(f"leniency must be >= 1 (1 = exact), got {leniency}")
        self.levels = [Level(name, p, LevelStats(name)) for name, p in levels]
        self.k = self._ks(k)
        self.confidence_threshold = confidence_threshold
        self.leniency = leniency
        target = self.levels[-1].runner
        if eos_token_id is None:
            eos_token_id = target.eos_token_ids or target.eos_token_id
        self.eos_token_ids = tuple(t for t in (eos_token_id if isinstance(eos_token_id, Sequence) else [eos_token_id]) if t is not None)
        self.generator = torch.Generator()  # uniforms of unseeded rejection sampling
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.requests: dict[str, Request] = {}
        self.depth = depth  # SpecServe's per-step depth for requests with `adaptive_depth` (may serve other chains too)
        self.key = tuple(name for name, _ in levels)
        # n-gram lookup right below the target costs a round the same at any depth: no cost per step
        self._lookup_drafts = len(self.levels) == 2 and self.levels[0].runner is None
        self.stats = ChainStats([lv.stats for lv in self.levels])
        self.reset_stats()

    @property
    def top(self) -> int:
        return len(self.levels) - 1

    def _ks(self, k: int | Sequence[int]) -> list[int]:
        ks = [k] * self.top if isinstance(k, int) else list(k)
        if len(ks) != self.top or any(x < 0 for x in ks):
            raise ValueError(f"k needs {self.top} values >= 0 (one per proposing level), got {k!r}")
        return ks

    # -- requests ------------------------------------------------------------------------
    def add(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        sampling: SamplingParams = GREEDY,
        k: int | Sequence[int] | None = None,
        confidence_threshold: float | None = None,
        request_id: str | None = None,
        stop_at_eos: bool = True,
        logprobs: int = -1,
        prompt_logprobs: int = -1,
        adaptive_depth: bool = False,
    ) -> Request:
        """Prefill every level with `prompt` and emit the target's first token.

        `adaptive_depth`: with the chain's `depth` policy, each step verifies as many of the
        top proposing level's k drafts as pay at the current load (`shared.engine.depth`);
        otherwise always k.

        `logprobs` >= 0: every output token also gets its log-probability under the target and
        the `logprobs` likeliest tokens at its position (`Request.output_logprobs`);
        `prompt_logprobs` >= 0: the same for every prompt token after the first, from the
        target's prefill (`Request.prompt_logprobs`)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        for name, value in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if not -1 <= value <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be -1 (none) or 0..{MAX_TOP_LOGPROBS}, got {value}")
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        sampling = sampling.starting_at(len(prompt))  # every level counts the output from one place
        if rid in self.requests:
            raise ValueError(f"request {rid!r} is already running")
        req = Request(
            rid,
            list(prompt),
            max_tokens,
            sampling,
            self.k if k is None else self._ks(k),
            self.confidence_threshold if confidence_threshold is None else confidence_threshold,
            stop_at_eos,
            adaptive_depth=adaptive_depth and self.depth is not None,
            logprobs=logprobs,
        )
        reach = len(req.prompt) + max_tokens + sum(req.k)  # drafts may run sum(k) past the end
        for level in self.levels:
            if level.runner is not None and reach > level.runner.max_len:
                raise ValueError(
                    f"prompt ({len(req.prompt)} tokens) + max_tokens ({max_tokens}) + drafts ({sum(req.k)}) "
                    f"exceed max_len={level.runner.max_len} of level {level.name!r}"
                )
        t0 = time.perf_counter()
        try:
            for level in self.levels:
                runner = level.runner
                if runner is None:
                    continue
                s = time.perf_counter()
                if prompt_logprobs >= 0 and level is self.levels[-1]:  # the target scores the prompt
                    rows = runner.prefill_rows(rid, req.prompt, sampling)
                    req.prompt_logprobs = logprobs_of(rows[:-1], req.prompt[1:], prompt_logprobs, ranks=True)
                    p0 = rows[-1]
                else:
                    p0 = runner.prefill(rid, req.prompt, sampling)
                level.stats.seconds += time.perf_counter() - s
        except Exception:
            self.release(rid)  # no level keeps a slot for a request that never started
            raise
        req.cached_prompt = self.levels[-1].runner.cached_prefix(rid)
        first = int(choose(p0[None], sampling, [len(req.prompt)], self.levels[-1].runner.generator)[0])
        self.requests[rid] = req
        self._emit(req, [first], p0[None])
        self.stats.seconds += time.perf_counter() - t0
        return req

    def _emit(self, req: Request, tokens: list[int], probs: torch.Tensor) -> None:
        """Append verified `tokens` (each drawn from its row of `probs`) to the request's output."""
        room = req.max_tokens - len(req.output)
        tokens = tokens[:room]
        ends = set(req.sampling.stop_token_ids)
        if req.stop_at_eos:
            ends.update(self.eos_token_ids)
        end = next((j for j, t in enumerate(tokens) if t in ends), None)
        if end is not None:
            tokens = tokens[: end + 1]
            req.done = req.stopped = True
        req.output.extend(tokens)
        if req.logprobs >= 0:
            req.output_logprobs.extend(logprobs_of(probs, tokens, req.logprobs))
        self.stats.tokens += len(tokens)
        if len(req.output) >= req.max_tokens:
            req.done = True
        if req.done:
            self.release(req.request_id)

    def release(self, request_id: str) -> None:
        """Free a request's caches at every level."""
        for level in self.levels:
            if level.runner is not None:
                level.runner.release(request_id)
        self.requests.pop(request_id, None)
        if self.depth is not None:
            self.depth.forget(request_id)

    # -- the recursion -------------------------------------------------------------------
    def _produce(self, i: int, reqs: list[Request], ctx: dict[str, list[int]], n: dict[str, int]) -> dict[str, Draft]:
        """Up to n[r] tokens per request from level i, continuing ctx[r]."""
        level = self.levels[i]
        todo = [r for r in reqs if n[r.request_id] > 0]
        empty = Draft([], torch.empty(0, level.proposer.vocab_size))
        out = {r.request_id: empty for r in reqs}
        if not todo:
            return out
        if i == 0:
            s = time.perf_counter()
            ids = [r.request_id for r in todo]
            if level.runner is None:
                drafts = level.proposer.propose([ctx[x] for x in ids], [n[x] for x in ids])
            else:
                runner = level.runner
                feeds = [ctx[x][runner.length(x) :] for x in ids]
                drafts = runner.propose(ids, feeds, [n[x] for x in ids], [r.confidence_threshold for r in todo])
            level.stats.seconds += time.perf_counter() - s
            out.update(zip(ids, drafts))
            return out
        base = {r.request_id: len(ctx[r.request_id]) for r in todo}
        tokens = {r.request_id: [] for r in todo}
        rows: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in todo}
        local = {r.request_id: list(ctx[r.request_id]) for r in todo}
        active = todo
        while active:
            verdicts = self._round(i, active, local)
            still = []
            for r in active:
                rid = r.request_id
                v = verdicts[rid]
                tokens[rid].extend(v.tokens)
                rows[rid].append(v.probs)
                local[rid].extend(v.tokens)
                if len(tokens[rid]) < n[rid]:
                    still.append(r)
            active = still
        for r in todo:
            rid = r.request_id
            if len(tokens[rid]) > n[rid]:  # keep exactly n: drop the tail everywhere below
                self._sync(i, rid, base[rid] + n[rid])
            probs = torch.cat(rows[rid])[: n[rid]]
            out[rid] = Draft(tokens[rid][: n[rid]], probs)
        return out

    def _round(self, i: int, reqs: list[Request], ctx: dict[str, list[int]]):
        """One verification at level i: drafts from below, one forward, verify, roll back."""
        drafts = self._drafts(i, reqs, ctx)
        s = time.perf_counter()
        ids = [r.request_id for r in reqs]
        scored = self.levels[i].runner.score(ids, self._chunks(i, ids, ctx, drafts))
        verdicts = self._judge(i, reqs, ctx, drafts, scored)
        self.levels[i].stats.seconds += time.perf_counter() - s
        return verdicts

    def _drafts(self, i: int, reqs: list[Request], ctx: dict[str, list[int]]) -> dict[str, Draft]:
        """What level i verifies next: up to k[i - 1] tokens per request from the level below."""
        if i > 0:
            n = {r.request_id: min(r.k[i - 1], r.max_tokens - len(r.output) - 1) for r in reqs}
            if i == self.top and self.depth is not None:
                steered = [r for r in reqs if r.adaptive_depth]
                allowed = self.depth.depths(self.key, {r.request_id: n[r.request_id] for r in steered}, len(reqs))
                for r in steered:
                    m = allowed[r.request_id]
                    if m >= 0:
                        r.depths.extend([0] * (m + 1 - len(r.depths)))
                        r.depths[m] += 1
                n.update(allowed)
            return self._produce(i - 1, reqs, ctx, n)
        vocab = self.levels[i].proposer.vocab_size
        return {r.request_id: Draft([], torch.empty(0, vocab)) for r in reqs}

    def _chunks(self, i: int, ids: list[str], ctx: dict[str, list[int]], drafts: dict[str, Draft]) -> list[list[int]]:
        """Per request, what level i's forward writes: the context it has not seen, then the drafts."""
        runner = self.levels[i].runner
        return [ctx[rid][runner.length(rid) :] + drafts[rid].tokens for rid in ids]

    def _judge(self, i: int, reqs: list[Request], ctx: dict[str, list[int]], drafts: dict[str, Draft], scored) -> dict:
        """Verify level i's scores against the drafts, count, and roll every cache at or below i back."""
        verdicts = {}
        leniency = self.leniency if i < self.top else 1.0
        for r, p in zip(reqs, scored):
            rid = r.request_id
            d = drafts[rid]
            k = len(d.tokens)
            v = verify(d.tokens, d.probs, p[p.shape[0] - k - 1 :], r.sampling, len(ctx[rid]), self.generator, leniency)
            verdicts[rid] = v
            if i > 0 and k:
                self.levels[i - 1].stats.record(k, v.accepted, v.overlap, v.overlap_positions)
                below = self.levels[i - 1].name
                r.stats.setdefault(below, LevelStats(below)).record(k, v.accepted, v.overlap, v.overlap_positions)
                if i == self.top and self.depth is not None:
                    self.depth.record(self.key, rid, k, v.accepted)
        self.levels[i].stats.rounds += len(reqs)
        for r in reqs:
            self._sync(i, r.request_id, len(ctx[r.request_id]) + verdicts[r.request_id].accepted)
        return verdicts

    def _sync(self, i: int, request_id: str, valid: int) -> None:
        """Roll every cache at levels <= i back to at most `valid` positions."""
        for level in self.levels[: i + 1]:
            runner = level.runner
            if runner is not None:
                length = runner.length(request_id)
                if length > valid:
                    runner.rollback(request_id, valid)

    # -- driving -------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """One target verification over every live request; returns those that finished."""
        pending = self.propose()
        return verify_rounds([pending])[0] if pending is not None else []

    def propose(self) -> PendingRound | None:
        """The first half of `step`: every level below the target drafts for every live request.

        The target's forward is left to `verify_rounds`, which can run it once for the rounds
        of several chains that share the target (a server with requests on different chains).
        """
        reqs = [r for r in self.requests.values() if not r.done]
        if not reqs:
            return None
        t0 = time.perf_counter()
        ctx = {r.request_id: r.tokens for r in reqs}
        drafts = self._drafts(self.top, reqs, ctx)
        spent = time.perf_counter() - t0
        self.stats.seconds += spent
        if self.depth is not None and not self._lookup_drafts:
            self.depth.observe_draft(self.key, max((len(d.tokens) for d in drafts.values()), default=0), spent)
        ids = [r.request_id for r in reqs]
        return PendingRound(self, reqs, ctx, drafts, ids, self._chunks(self.top, ids, ctx, drafts))

    def conclude(self, pending: PendingRound, scored, seconds: float = 0.0) -> list[Request]:
        """The second half of `step`: verify the target's scores, emit, return the finished requests."""
        t0 = time.perf_counter()
        verdicts = self._judge(self.top, pending.reqs, pending.ctx, pending.drafts, scored)
        finished = []
        for r in pending.reqs:
            self._emit(r, verdicts[r.request_id].tokens, verdicts[r.request_id].probs)
            if r.done:
                finished.append(r)
        spent = seconds + time.perf_counter() - t0
        self.levels[self.top].stats.seconds += spent
        self.stats.seconds += spent
        return finished

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
        k: int | Sequence[int] | None = None,
        confidence_threshold: float | None = None,
        stop_at_eos: bool = True,
    ) -> list[list[int]]:
        """Generate for a batch of prompts in lockstep; returns each request's new tokens."""
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        reqs = [self.add(p, max_tokens, sp, k, confidence_threshold, stop_at_eos=stop_at_eos) for p, sp in zip(prompts, params)]
        while any(not r.done for r in reqs):
            self.step()
        return [r.output for r in reqs]

    def reset_stats(self) -> None:
        """Start counting afresh (runner counters are read as differences, never reset)."""
        for level in self.levels:
            level.stats.__init__(level.name)
        self.stats.tokens = 0
        self.stats.seconds = 0.0
        self._baseline = {lv.name: (lv.runner.forwards, lv.runner.forward_s) for lv in self.levels if lv.runner is not None}

    def collect_stats(self) -> ChainStats:
        """The stats since construction or `reset_stats`, with forward counts and times."""
        for level in self.levels:
            if level.runner is not None:
                forwards, seconds = self._baseline[level.name]
                level.stats.forwards = level.runner.forwards - forwards
                level.stats.step_seconds = level.runner.forward_s - seconds
        return self.stats


@dataclass
class PendingRound:
    """A chain's round waiting for the target: its live requests, contexts, drafts and target chunks."""

    chain: Chain
    reqs: list[Request]
    ctx: dict[str, list[int]]
    drafts: dict[str, Draft]
    ids: list[str]
    chunks: list[list[int]]


def verify_rounds(rounds: Sequence[PendingRound]) -> list[list[Request]]:
    """Finish several chains' rounds with one target forward; the finished requests of each.

    Every chain must end in the same target runner. One batched forward instead of one per
    chain keeps a server's batch whole when its requests run on different chains.
    """
    if not rounds:
        return []
    target = rounds[0].chain.levels[-1].runner
    if any(r.chain.levels[-1].runner is not target for r in rounds):
        raise ValueError("rounds verified together must share one target runner")
    chunks = [c for r in rounds for c in r.chunks]
    t0 = time.perf_counter()
    scored = target.score([rid for r in rounds for rid in r.ids], chunks)
    if any(r.chain.depth is not None for r in rounds):
        synchronize(target.device)  # the policy learns from this time (the verdicts wait for it anyway)
    seconds = time.perf_counter() - t0
    total = sum(len(r.ids) for r in rounds)
    out, at = [], 0
    for r in rounds:
        part = scored[at : at + len(r.ids)]
        at += len(r.ids)
        out.append(r.chain.conclude(r, part, seconds * len(r.ids) / total))
    for policy in {id(r.chain.depth): r.chain.depth for r in rounds if r.chain.depth is not None}.values():
        policy.observe_verify(len(chunks), max(map(len, chunks)), seconds)
        policy.observe_round(time.perf_counter())
    return out
