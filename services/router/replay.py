"""What the router would decide from the history in PostgreSQL, offline.

    specmesh router replay                       # per class, at batch 1, 4 and 16
    specmesh router replay --batch 1,12 --class code-short --json
    specmesh router replay --until 2026-12-02T07:05:00Z   # as of that moment

A fresh `Router` (no NATS, no running router needed) resumes from the newest rows of each
history table, as a restarted router does, then decides every class at each batch given;
from `router.shared_chain_batch` on, also the one chain (and k) every class would share.
It answers "why did the router do that" from a benchmark's rows in seconds, where a rerun
of the benchmark takes minutes; the time-based parts (exploration, staleness, the hold
after a loaded moment) are left out. `--until` replays the history as it stood at a moment
of a run (rows written after it are left out): why the table of that moment said what it did.
"""

from __future__ import annotations

from datetime import datetime

from services.router.decision import Choice
from services.router.service import DEFAULT_CLASS, Router, family_params
from services.router.store import HistoryStore


async def load_history(url: str, rows: int, until: datetime | None = None) -> dict[str, list[dict]]:
    """The newest `rows` rows of each history table, as of `until` if given (raises if
    PostgreSQL is unreachable)."""
    store = HistoryStore(url)
    await store.start()  # writes nothing: no row is added
    try:
        return await store.load_recent(rows, until)
    finally:
        await store.close()


def _choice(c: Choice, top: int) -> dict:
    options = sorted(c.options, key=lambda p: p.ms_per_token)[:top]
    return {"winner": {"chain": ",".join(c.winner.chain), "k": list(c.winner.k),
                       "ms_per_token": round(c.winner.ms_per_token, 4)},
            "reason": c.reason, "why": c.why,
            "cheapest": [{"chain": ",".join(p.chain), "k": list(p.k), "ms_per_token": round(p.ms_per_token, 4)}
                         for p in options]}


def replay(settings, history: dict[str, list[dict]], batches: list[float], request_class: str = "",
           top: int = 6) -> dict:
    """Resume a fresh router from `history`, then its decisions at each batch (JSON-ready)."""
    router = Router(settings, store=None, params=family_params(settings), seed=0)
    replayed = router.resume(history)
    out = {"rows": {table: len(rows) for table, rows in history.items()}, "replayed": replayed,
           "outcomes": sum(row.get("reason") == "outcome" for row in history.get("decisions", [])), "batches": []}
    for batch in batches:
        choices = router.decide_classes(batch)
        entry: dict = {"batch": batch, "classes": {cls: _choice(c, top) for cls, c in choices.items()
                                                   if cls != DEFAULT_CLASS and (not request_class or cls == request_class)}}
        if batch >= settings.router.shared_chain_batch:
            together = router.shared_table(choices, batch)
            winners = {(c.winner.chain, c.winner.k) for c in together.values()}
            if len(winners) == 1:
                (chain, ks), = winners
                entry["shared"] = {"chain": ",".join(chain), "k": list(ks),
                                   "why": next(iter(together.values())).why}
        out["batches"].append(entry)
    return out


def format_replay(data: dict) -> str:
    lines = [f"replayed {data['replayed']} history rows ({', '.join(f'{t} {n}' for t, n in data['rows'].items())}); "
             f"{data['outcomes']} outcomes"]
    if not data["outcomes"]:
        lines.append("no outcome in the history: every price below is the model's prior")
    for entry in data["batches"]:
        lines += ["", f"== batch {entry['batch']:g}"]
        if "shared" in entry:
            s = entry["shared"]
            lines.append(f"  under load every class would ride {s['chain']} k={s['k']}: {s['why']}")
        for cls, c in entry["classes"].items():
            w = c["winner"]
            lines.append(f"  [{cls}] -> {w['chain']} k={w['k']}  {w['ms_per_token']:.3f} ms/token ({c['reason']})")
            lines.append("      " + "; ".join(f"{p['chain']} k={p['k']} {p['ms_per_token']:.3f}" for p in c["cheapest"]))
    return "\n".join(lines)
