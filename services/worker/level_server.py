"""A runner served over NATS: the drafter's and verifier's side of a `LevelCall`.

Each item of a call names a request, its epoch and the cache length the caller expects.
Fencing: an item whose epoch is older than the newest seen for its request is refused
("stale epoch") and changes nothing. Rollback rides on the next call: a newer epoch with a
shorter `position` truncates the cache first (an O(1) length move). A replica that does
not hold the request (it restarted, or it is another replica) rebuilds the cache from
`context` when the caller sends it, and otherwise answers "missing context".
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from shared.engine.runner import Runner
from shared.engine.sampling import SamplingParams, choose
from shared.messages import LevelCall, LevelItem, LevelReply, LevelResult, Sampling

log = logging.getLogger("specmesh.level")

STALE = "stale epoch"
MISSING = "missing context"


def to_params(s: Sampling | None) -> SamplingParams:
    return SamplingParams.from_wire(s or Sampling())


def pack_probs(probs: torch.Tensor) -> bytes:
    return probs.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def unpack_probs(data: bytes, rows: int, vocab: int) -> torch.Tensor:
    if rows == 0:
        return torch.empty(0, vocab)
    return torch.from_numpy(np.frombuffer(data, dtype=np.float32).copy().reshape(rows, vocab))


class LevelServer:
    """Applies LevelCalls to one runner; called from a single model thread."""

    def __init__(self, runner: Runner, worker: str):
        self.runner = runner
        self.worker = worker
        self.epochs: dict[str, int] = {}
        self.params: dict[str, SamplingParams] = {}

    def known(self, request_id: str) -> bool:
        return request_id in self.params

    def handle(self, call: LevelCall) -> LevelReply:
        start = time.perf_counter()
        handler = {"prefill": self._prefill, "propose": self._propose, "score": self._score,
                   "rollback": self._rollback, "release": self._release}.get(call.op)
        if handler is None:
            return LevelReply(self.worker, [], error=f"unknown op {call.op!r}")
        results = handler(call)
        return LevelReply(self.worker, results, self.runner.vocab_size, (time.perf_counter() - start) * 1e3)

    # -- fencing and positioning ---------------------------------------------------------
    def _admit(self, item: LevelItem) -> str | None:
        """Bring the request's cache to `item.position`; an error string if it cannot."""
        rid = item.request_id
        if item.epoch < self.epochs.get(rid, -1):
            return STALE
        if not self.known(rid) or self.runner.length(rid) < item.position:
            if len(item.context) < item.position or item.sampling is None:
                return MISSING
            self._open(rid, item.context[: item.position], item.sampling)
        self.epochs[rid] = item.epoch
        if self.runner.length(rid) > item.position:
            self.runner.rollback(rid, item.position)
        return None

    def _open(self, rid: str, tokens: list[int], sampling: Sampling) -> None:
        if self.known(rid):
            self.runner.release(rid)
        params = to_params(sampling)
        self.params[rid] = params
        if tokens:
            self.runner.prefill(rid, tokens, params)

    # -- operations ----------------------------------------------------------------------
    def _prefill(self, call: LevelCall) -> list[LevelResult]:
        results = []
        for item in call.items:
            if item.epoch < self.epochs.get(item.request_id, -1):
                results.append(LevelResult(item.request_id, -1, error=STALE))
                continue
            try:
                self._open(item.request_id, item.tokens, item.sampling or Sampling())
                self.epochs[item.request_id] = item.epoch
                results.append(LevelResult(item.request_id, self.runner.length(item.request_id)))
            except (ValueError, RuntimeError, KeyError) as exc:
                results.append(LevelResult(item.request_id, -1, error=str(exc)))
        return results

    def _batch(self, call: LevelCall):
        """(admitted items, results with errors filled for the refused ones)."""
        results: dict[str, LevelResult] = {}
        ok: list[LevelItem] = []
        for item in call.items:
            try:
                error = self._admit(item)
            except (ValueError, RuntimeError, KeyError) as exc:
                error = str(exc)
            if error:
                length = self.runner.length(item.request_id) if self.known(item.request_id) else -1
                results[item.request_id] = LevelResult(item.request_id, length, error=error)
            else:
                ok.append(item)
        return ok, results

    def _propose(self, call: LevelCall) -> list[LevelResult]:
        ok, results = self._batch(call)
        if ok:
            ids = [i.request_id for i in ok]
            drafts = self.runner.propose(ids, [i.tokens for i in ok], [i.k for i in ok],
                                         [i.confidence_threshold for i in ok])
            for item, draft in zip(ok, drafts):
                res = LevelResult(item.request_id, self.runner.length(item.request_id), draft.tokens, draft.confidence)
                if call.want_probs:
                    res.probs, res.rows = pack_probs(draft.probs), len(draft.tokens)
                results[item.request_id] = res
        return [results[i.request_id] for i in call.items]

    def _score(self, call: LevelCall) -> list[LevelResult]:
        ok, results = self._batch(call)
        if ok:
            ids = [i.request_id for i in ok]
            starts = [i.position for i in ok]
            scored = self.runner.score(ids, [i.tokens for i in ok])
            for item, start, probs in zip(ok, starts, scored):
                res = LevelResult(item.request_id, self.runner.length(item.request_id))
                params = self.params[item.request_id]
                if call.want_probs or not (params.greedy or params.seeded):
                    res.probs, res.rows = pack_probs(probs), probs.shape[0]
                else:  # greedy and seeded choices are a function of (probs, position): send them alone
                    positions = [start + 1 + j for j in range(probs.shape[0])]
                    res.tokens = choose(probs, params, positions).tolist()
                    res.rows = probs.shape[0]
                results[item.request_id] = res
        return [results[i.request_id] for i in call.items]

    def _rollback(self, call: LevelCall) -> list[LevelResult]:
        ok, results = self._batch(call)  # admitting an item is the rollback
        for item in ok:
            results[item.request_id] = LevelResult(item.request_id, self.runner.length(item.request_id))
        return [results[i.request_id] for i in call.items]

    def _release(self, call: LevelCall) -> list[LevelResult]:
        results = []
        for item in call.items:
            if self.known(item.request_id):
                self.runner.release(item.request_id)
            self.params.pop(item.request_id, None)
            self.epochs.pop(item.request_id, None)
            results.append(LevelResult(item.request_id, 0))
        return results
