"""The router service process: chain assignments from profiles and acceptance history.

    specmesh serve router          (started by `make up`)
    specmesh router explain --json

Listens to the drivers' feedback (`specmesh.feedback.outcome`, `specmesh.feedback.profile`),
keeps the estimates (services/router/estimates.py), decides per request class every
`publish_interval_s` (services/router/decision.py) and publishes the table on
`specmesh.router.assignments` with an increasing version; answers `specmesh.router.explain`.
History goes to PostgreSQL through a buffered writer (services/router/store.py); the
router decides from memory whether or not PostgreSQL is up, and resumes from it on start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time

from services.router.cost_model import predict
from services.router.decision import (
    TARGET_ALONE, Choice, decide, explore_depth, explore_shared_depth, hold, predict_at_depths, served_chains, shared,
    tokens_per_round,
)
from services.router.estimates import BUCKET_BATCH, BUCKET_FROM, Estimates, depth_shares, load_bucket, valid_depths
from shared.engine.build import canonical
from services.router.store import HistoryStore
from shared.messages import (
    SUBJECT_ASSIGNMENTS, SUBJECT_EXPLAIN, SUBJECT_OUTCOME, SUBJECT_PROFILE, Assignment, Assignments, BadMessage, Candidate,
    ExplainQuery, Explanation, LevelOutcome, LoadTable, ModelStep, Outcome, StepProfile, decode, encode,
)
from shared.request_class import CLASSES
from shared.service import ServiceProcess
from shared.tracing import SpanKind, continued, tracer

log = logging.getLogger("specmesh.router")
DEFAULT_CLASS = "default"
ALTERNATIVES = 4  # candidates per class in the table, for requests with their own TPOT objective
DISCOVER_EVERY_S = 5.0
DISCOVER_SOON_S = 0.5  # between tries while no worker has answered yet
# An outcome whose rounds mostly verified other chains too is not calibrated: its TPOT was set
# by the slowest chain's proposal in each round, not by its own chain.
MIXED_MAX = 0.5
MEMO_MAX = 512  # decisions kept between observations (`Router.decide_one`): classes x batches decided at


def family_params(settings) -> dict[str, int]:
    """Parameter counts of the family's models (for the step-time prior); empty if unknown."""
    try:
        from shared.models.family import resolve_family

        family = resolve_family(settings)
        return {name: entry.params for name, entry in family.models.items()}
    except Exception as exc:  # the prior is only a starting point
        log.info("no family parameter counts for step-time priors: %s", exc)
        return {}


class Router:
    """The router's state and logic without the NATS shell (tests drive it directly)."""

    def __init__(self, settings, store: HistoryStore | None = None, params: dict[str, int] | None = None,
                 seed: int | None = None):
        cfg = settings.router
        self.settings = settings
        self.cfg = cfg
        self.store = store
        self.estimates = Estimates(cfg.half_life_tokens, cfg.profile_window, cfg.hop_ms, params)
        self.chains = served_chains()
        self.available: set[str] | None = None  # models some worker serves (None: not discovered yet)
        self.rng = random.Random(seed)
        self.version = 0
        self.choices: dict[str, Choice] = {}
        self.by_load: list[tuple[float, float, dict[str, Choice]]] = []  # (from batch, batch, choices) last published
        self.shared_chains: dict[int, tuple[str, ...]] = {}  # load bucket -> the chain last shared there
        self.shared_ks: dict[int, tuple[int, ...]] = {}  # load bucket -> the k every class last took on it
        self.held: dict[tuple[str, int], tuple] = {}  # (class, load bucket) -> its last cost winner (chain, k)
        self.recorded: dict[str, tuple] = {}
        self._memo: dict[tuple[str, float], Choice] = {}  # (class, batch) -> `decide` without trials (`decide_one`)
        self._memo_context: tuple | None = None

    # -- feedback ------------------------------------------------------------------------
    def on_outcome(self, outcome: Outcome) -> None:
        self.estimates.observe_outcome(outcome)
        self.estimates.observe_traffic(outcome.request_class)
        chain = tuple(canonical(c) for c in outcome.chain)
        # The load the request ran under (its driver's mean round size), not the load now.
        batch = outcome.batch_mean if outcome.batch_mean >= 1.0 else self.estimates.batch()
        depths = valid_depths(outcome.depths)
        if depths is None or not outcome.k:
            raw = predict(chain, tuple(outcome.k), outcome.request_class, self.estimates, batch, calibrated=False).model_ms
        else:  # the model at the depths its rounds took, not at k in every round
            raw = predict_at_depths(chain, tuple(outcome.k), outcome.request_class, self.estimates, batch,
                                    depth_shares(depths, outcome.k[-1]))
        rounds = Estimates.target_rounds(outcome)
        per_round = self.modelled_per_round(chain, tuple(outcome.k), outcome.request_class, depths)
        if per_round is not None:
            self.estimates.observe_emitted(chain, outcome.request_class, outcome.tokens, rounds, per_round)
        if outcome.tokens >= 2 and outcome.tpot_ms > 0 and outcome.mixed_share <= MIXED_MAX:
            round_ms = Estimates.round_time(outcome.tpot_ms, outcome.tokens, rounds)
            self.estimates.observe_calibration(chain, batch, outcome.tpot_ms, raw, tuple(outcome.k), outcome.request_class,
                                               round_ms, depths)
        if self.store is None:
            return
        for level in outcome.levels:
            bottom = chain and canonical(level.name) == chain[0]
            top = canonical(level.verifier) == "target"
            self.store.add("pair_stats", {
                "proposer": canonical(level.name), "verifier": canonical(level.verifier),
                "request_class": outcome.request_class, "drafted": level.drafted, "accepted": level.accepted,
                "accepted_per_position": list(level.accepted_per_pos),
                "drafted_per_position": list(level.drafted_per_pos),
                "tv_distance": round(1 - level.overlap / level.overlap_positions, 6) if level.overlap_positions else None,
                "request_id": outcome.request_id[:64],
                "rounds": Estimates.rounds(outcome, level) if bottom else None,
                "depths": depths if top else None,
            })
        current = self.choices.get(outcome.request_class)
        slo = outcome.slo_tpot_ms or self.cfg.slo_tpot_ms
        self.store.add("decisions", {
            "request_id": outcome.request_id[:64], "request_class": outcome.request_class,
            "chain": ",".join(chain), "k": list(outcome.k), "predicted_ms_per_token": raw,
            "explored": bool(current and current.explored and current.winner.chain == chain),
            "tokens": outcome.tokens,
            "tokens_per_s": outcome.tokens / (outcome.duration_ms / 1e3) if outcome.duration_ms > 0 else None,
            "ttft_ms": outcome.ttft_ms, "tpot_ms": outcome.tpot_ms,
            "slo_met": (outcome.tpot_ms <= slo) if slo else None, "reason": "outcome",
            "version": self.version or None, "duration_ms": outcome.duration_ms, "batch_mean": batch,
            "mixed_share": outcome.mixed_share, "depths": depths, "tokens_per_round": per_round,
        })

    def modelled_per_round(self, chain: tuple[str, ...], ks: tuple[int, ...], request_class: str,
                           depths: list[int] | None) -> float | None:
        """The model's tokens per target round for a request's rounds now (None: the target alone)."""
        if chain == TARGET_ALONE or not ks or not request_class:
            return None
        shares = depth_shares(depths, ks[-1]) if depths else None
        return tokens_per_round(chain, ks, request_class, self.estimates, shares)

    def on_profile(self, profile: StepProfile) -> None:
        self.estimates.observe_profile(profile)
        if self.store is None:
            return
        for step in profile.steps:
            if step.forwards <= 0:
                continue
            self.store.add("model_profiles", {
                "model": canonical(step.model), "device": step.device[:64], "batch_size": round(step.batch_size),
                "tokens_per_step": round(step.tokens / step.forwards), "step_ms": step.seconds * 1e3 / step.forwards,
                "samples": step.forwards, "worker": profile.worker[:64], "batch_mean": step.batch_size,
                "tokens_per_forward": step.tokens / step.forwards, "live_requests": profile.live_requests,
            })

    def resume(self, history: dict[str, list[dict]]) -> int:
        """Replay rows read back from PostgreSQL into the estimates; rows replayed."""
        n = 0
        for row in history.get("model_profiles", []):
            if row.get("tokens_per_forward") is None or not row.get("samples"):
                continue
            step = ModelStep(row["model"], row["device"], row["samples"], row["step_ms"] * row["samples"] / 1e3,
                             round(row["tokens_per_forward"] * row["samples"]), row.get("batch_mean") or 1.0)
            self.estimates.observe_step(step)
            n += 1
        rounds: dict[str, int] = {}  # request -> the target's rounds (two-level chains: the bottom level's row)
        for row in history.get("pair_stats", []):
            if row.get("rounds") is not None and row.get("verifier") == "target" and row.get("request_id"):
                rounds[row["request_id"]] = row["rounds"]
            tv = row.get("tv_distance")  # measured on every drafted position of a sampled request
            level = LevelOutcome(row["proposer"], row["verifier"], row["drafted"], row["accepted"],
                                 list(row["drafted_per_position"] or []), list(row["accepted_per_position"] or []),
                                 (1 - tv) * row["drafted"] if tv is not None else 0.0,
                                 row["drafted"] if tv is not None else 0)
            self.estimates.observe_level(level, row["request_class"], row.get("rounds"), depths=row.get("depths"))
            n += 1
        for row in history.get("decisions", []):
            if row.get("reason") == "outcome" and row.get("request_class"):
                self.estimates.observe_traffic(row["request_class"])
                if row.get("tokens_per_round") and row.get("request_id") in rounds:  # the model's then
                    self.estimates.observe_emitted(tuple(row["chain"].split(",")), row["request_class"], row.get("tokens") or 0,
                                                   rounds[row["request_id"]], row["tokens_per_round"])
            if row.get("reason") == "outcome" and row.get("tpot_ms") and row.get("predicted_ms_per_token") \
                    and (row.get("tokens") or 0) >= 2 and (row.get("mixed_share") or 0.0) <= MIXED_MAX:
                chain = tuple(row["chain"].split(","))
                target_rounds = row["tokens"] - 1 if chain == ("target",) else rounds.get(row.get("request_id") or "")
                self.estimates.observe_calibration(chain, row.get("batch_mean") or 1.0,
                                                   row["tpot_ms"], row["predicted_ms_per_token"], tuple(row.get("k") or ()),
                                                   row.get("request_class") or "",
                                                   Estimates.round_time(row["tpot_ms"], row["tokens"], target_rounds),
                                                   row.get("depths"))
                n += 1
        return n

    # -- deciding ------------------------------------------------------------------------
    def decide_all(self, explore: bool = True) -> dict[str, Choice]:
        cfg = self.cfg
        # Decided at the current load, but a lull within `load_hold_s` of a loaded moment keeps
        # the under-load rules (one chain for every class, no chain trials): a burst landing in
        # it must not be split over per-class chains and trials it keeps for life.
        batch, held = self.estimates.batch(), self.estimates.held_batch(cfg.load_hold_s)
        chain_rate = cfg.explore_rate if explore and held <= cfg.explore_max_batch else 0.0
        depth_rate = cfg.explore_depth_rate if explore else 0.0  # the same chain: at any load
        choices = self.decide_classes(batch, chain_rate)
        if held >= cfg.shared_chain_batch:
            choices = self.shared_table(choices, batch)
        if all(c.shared for c in choices.values()) and len({(c.winner.chain, c.winner.k) for c in choices.values()}) == 1:
            # one chain at one k for every class: a depth trial moves them all, so rounds keep one width
            choices = explore_shared_depth(choices, self.estimates, batch, cfg.k_max, self.rng, depth_rate,
                                           cfg.explore_until, cfg.explore_stale_s)
        else:
            choices = {cls: explore_depth(c, self.estimates, batch, cfg.k_max, self.rng,
                                          depth_rate if cls != DEFAULT_CLASS else 0.0, cfg.explore_until,
                                          cfg.explore_stale_s)
                       for cls, c in choices.items()}
        self.choices = choices
        return choices

    def decide_by_load(self) -> list[tuple[float, float, dict[str, Choice]]]:
        """The tables of the load buckets above the current one that are under load (from
        `shared_chain_batch`): one chain for every class, no trials, decided at each bucket's
        batch. A gateway takes one when its own requests in flight say a burst has landed
        that the router, a publication behind, has not seen: a request keeps the chain it
        starts with for its whole life. Empty while nothing has run (the model alone would
        decide, at 679 predictions per class and bucket)."""
        cfg = self.cfg
        if not self.estimates.ran:
            return []
        here = load_bucket(self.estimates.batch())
        out = []
        for bucket, batch in enumerate(BUCKET_BATCH):
            if bucket <= here or BUCKET_FROM[bucket] < cfg.shared_chain_batch:
                continue
            out.append((BUCKET_FROM[bucket], batch, self.shared_table(self.decide_classes(batch), batch)))
        return out

    def shared_table(self, choices: dict[str, Choice], batch: float) -> dict[str, Choice]:
        """Rule 5 at `batch`, holding the chain last shared at its load bucket within
        `shared_switch_margin` (the current table and the load tables keep one each)."""
        bucket = load_bucket(batch)
        out = shared(choices, batch, self.cfg.margin, self.shared_chains.get(bucket), self.cfg.shared_switch_margin,
                     self.shared_ks.get(bucket), self.estimates.shares(choices), self.cfg.shared_k_switch_margin)
        winners = {(c.winner.chain, c.winner.k) for c in out.values() if c.shared}
        if len({chain for chain, _ in winners}) == 1:
            self.shared_chains[bucket] = next(iter(winners))[0]
            if len(winners) == 1:
                self.shared_ks[bucket] = next(iter(winners))[1]
        return out

    def decide_classes(self, batch: float, chain_rate: float = 0.0) -> dict[str, Choice]:
        """Every class's decision at `batch` from what was measured; chain trials at `chain_rate`."""
        cfg = self.cfg
        bucket = load_bucket(batch)
        out = {}
        for cls in (*CLASSES, DEFAULT_CLASS):
            if cls != DEFAULT_CLASS and chain_rate > 0 and self.rng.random() < chain_rate:  # a chain trial's interval
                choice = self.decide_one(cls, batch, explore=True)
            else:
                choice = self.decide_one(cls, batch)
            choice = hold(choice, self.held.get((cls, bucket)), cfg.class_switch_margin, cfg.slo_tpot_ms)
            best = choice.best or choice.winner
            self.held[(cls, bucket)] = (best.chain, best.k)
            out[cls] = choice
        return out

    def decide_one(self, cls: str, batch: float, explore: bool = False) -> Choice:
        """`decide` for one class at `batch` from what was measured; `explore`: a chain trial
        if one qualifies. Without a trial, the same inputs give the same choice, so it is kept
        until any of them moves (an observation, the models up, the chains, the settings): an
        idle router with a history spent 60-70 ms of CPU a second deciding the same table
        again (7% of a core on a 2-core machine, beside the services it serves)."""
        cfg = self.cfg

        def run(rate: float) -> Choice:
            return decide(cls, self.estimates, self.chains, cfg.k_max, cfg.margin, cfg.slo_tpot_ms, self.available,
                          rate, self.rng if rate else None, batch, measured_only=True,
                          explore_until=cfg.explore_until, explore_stale_s=cfg.explore_stale_s)

        if explore:
            return run(1.0)
        context = (self.estimates, self.estimates.version, cfg, tuple(self.chains),
                   None if self.available is None else frozenset(self.available))
        if self._memo_context is None or len(self._memo) > MEMO_MAX or any(
                a is not b and a != b for a, b in zip(context, self._memo_context)):
            self._memo_context, self._memo = context, {}
        key = (cls, batch)
        if key not in self._memo:
            self._memo[key] = run(0.0)
        return self._memo[key]

    def next_version(self) -> int:
        """Milliseconds since the epoch, strictly increasing: a restarted router's versions keep growing."""
        self.version = max(self.version + 1, int(time.time() * 1000))
        return self.version

    def table(self) -> Assignments:
        choices = self.decide_all()
        version = self.next_version()

        def entry(cls: str, c: Choice) -> Assignment:
            # Under load (`shared`) the one chain is the only alternative: a request with an
            # objective that took another would slow every request in its rounds.
            ranking = [c.winner] if c.shared else c.ranking[:ALTERNATIVES]
            alternatives = [Candidate(list(p.chain), list(p.k), round(p.ms_per_token, 4)) for p in ranking]
            return Assignment(cls, list(c.winner.chain), list(c.winner.k), round(c.winner.ms_per_token, 4), c.reason,
                              alternatives)

        def entries(choices: dict[str, Choice]) -> list[Assignment]:
            return [entry(cls, c) for cls, c in choices.items() if cls != DEFAULT_CLASS]

        self.by_load = self.decide_by_load()
        table = Assignments(version, entries(choices), entry(DEFAULT_CLASS, choices[DEFAULT_CLASS]),
                            batch=round(self.estimates.batch(), 3), targets=self.estimates.targets(),
                            by_load=[LoadTable(start, batch, entries(c), entry(DEFAULT_CLASS, c[DEFAULT_CLASS]))
                                     for start, batch, c in self.by_load])
        if self.store is not None:
            for cls, c in choices.items():
                key = (c.winner.chain, c.winner.k, c.reason)
                if self.recorded.get(cls) != key or c.explored:
                    self.recorded[cls] = key
                    self.store.add("decisions", {
                        "request_id": None, "request_class": cls, "chain": ",".join(c.winner.chain),
                        "k": list(c.winner.k), "predicted_ms_per_token": c.winner.ms_per_token,
                        "explored": c.explored, "reason": c.reason, "version": version,
                    })
        return table

    def explain(self, request_class: str = "") -> Explanation:
        choices = self.choices or self.decide_all(explore=False)
        classes = {cls: c.as_dict() for cls, c in choices.items() if not request_class or cls == request_class}
        load = self.estimates.summary()
        load["held_batch"] = round(self.estimates.held_batch(self.cfg.load_hold_s), 3)  # keeps the under-load rules
        load["by_load"] = {f"from batch {start:g} (decided at {batch:g})": {
            cls: f"{','.join(c.winner.chain)} k={list(c.winner.k)}" for cls, c in choices.items()}
            for start, batch, choices in self.by_load}
        load["available_models"] = sorted(self.available) if self.available is not None else None
        load["chains"] = [",".join(c) for c in self.chains]
        load["settings"] = self.cfg.model_dump()
        return Explanation(self.version, classes, load, self.store.status() if self.store else {})


class RouterService(ServiceProcess):
    name = "router"
    description = "SpecMesh router: chain and k assignments"

    async def setup(self) -> None:
        cfg = self.settings.router
        self.store = HistoryStore(self.settings.database.app_url, cfg.flush_interval_s,
                                  buffer_rows=cfg.buffer_rows, tracer_=tracer(self.tracer_provider))
        loop = asyncio.get_running_loop()
        params = await loop.run_in_executor(None, family_params, self.settings)
        self.router = Router(self.settings, self.store, params)
        await self.store.start()
        if cfg.history_rows:
            try:
                history = await self.store.load_recent(cfg.history_rows)
                log.info("resumed from %d history rows", self.router.resume(history))
            except Exception as exc:  # decide from priors; history is written once PostgreSQL is back
                log.warning("history not loaded (%s): starting from priors", exc)
        self._subs = [
            await self.nc.subscribe(SUBJECT_OUTCOME, cb=self._on_outcome),
            await self.nc.subscribe(SUBJECT_PROFILE, cb=self._on_profile),
        ]
        await self.micro.add_endpoint(name="explain", subject=SUBJECT_EXPLAIN, handler=self._on_explain)
        self._tasks = [asyncio.create_task(self._publish_loop(), name="assignments"),
                       asyncio.create_task(self._discover_loop(), name="discover")]

    async def teardown(self) -> None:
        for task in getattr(self, "_tasks", []):
            task.cancel()
        for sub in getattr(self, "_subs", []):
            await sub.unsubscribe()
        if getattr(self, "store", None) is not None:
            await self.store.close()

    async def _on_outcome(self, msg) -> None:
        try:
            outcome = decode(msg.data, Outcome)
        except BadMessage as exc:
            log.warning("bad outcome: %s", exc)
            return
        # The driver sends the request's trace context: the feedback joins the request's trace.
        with continued(tracer(self.tracer_provider), "router.feedback", msg.headers, kind=SpanKind.CONSUMER,
                       attributes={"specmesh.request_id": outcome.request_id,
                                   "specmesh.chain": ",".join(outcome.chain)}):
            self.router.on_outcome(outcome)

    async def _on_profile(self, msg) -> None:
        try:
            self.router.on_profile(decode(msg.data, StepProfile))
        except BadMessage as exc:
            log.warning("bad profile: %s", exc)

    async def _on_explain(self, req) -> None:
        try:
            query = decode(req.data, ExplainQuery) if req.data else ExplainQuery()
            reply = self.router.explain(query.request_class)
        except BadMessage as exc:
            reply = Explanation(self.router.version, error=str(exc))
        await req.respond(encode(reply))

    async def _publish_loop(self) -> None:
        interval = self.settings.router.publish_interval_s
        while True:
            try:
                table = self.router.table()
                await self.nc.publish(SUBJECT_ASSIGNMENTS, encode(table))
            except Exception:  # a bug must not stop the publications
                log.exception("assignment table not published")
            await asyncio.sleep(interval)

    async def _discover_loop(self) -> None:
        """Which models some worker serves ($SRV.INFO of drafters and verifiers), every few seconds."""
        while True:
            try:
                found = await self._discover()
                if found or self.router.available is not None:
                    self.router.available = found
            except Exception as exc:
                log.debug("discovery failed: %s", exc)
            # Until a worker has answered (the router often starts first), ask again soon.
            await asyncio.sleep(DISCOVER_EVERY_S if self.router.available is not None else DISCOVER_SOON_S)

    async def _discover(self, wait_s: float = 0.5) -> set[str]:
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        models: set[str] = set()
        try:
            for role in ("drafter", "verifier"):
                await self.nc.publish(f"$SRV.INFO.{role}", b"", reply=inbox)
            deadline = time.monotonic() + wait_s
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except Exception:
                    break
                info = json.loads(msg.data)
                model = (info.get("metadata") or {}).get("model")
                if model:
                    models.add(canonical(model))
        finally:
            await sub.unsubscribe()
        return models
