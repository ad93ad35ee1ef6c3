"""How well a family's models agree, how fast each one steps, and what each chain should gain.

On held-out text of each domain (teacher-forced windows), for every (draft, verify) pair:
greedy agreement (the argmaxes match) and expected acceptance `1 - TV(p, q)`. Step latency
is one decoding step with a transformers `DynamicCache` at batch 1 and 8, one thread. The
predicted speedups use the BRIEF's formulas (section 3):
`E(a, k) = (1 - a^(k+1)) / (1 - a)`, `tau_1 = t_1`, `tau_{i+1} = (k_i tau_i + t_{i+1}) / E(a_i, k_i)`.

    specmesh models eval --profile tiny --json
"""

from __future__ import annotations

import itertools
import statistics
import time

PAIRS = (
    ("drafter-code", "target"),
    ("drafter-prose", "target"),
    ("verifier", "target"),
    ("drafter-code", "verifier"),
    ("drafter-prose", "verifier"),
)
CHAINS = (
    ("drafter-code", "target"),
    ("drafter-prose", "target"),
    ("verifier", "target"),
    ("drafter-code", "verifier", "target"),
    ("drafter-prose", "verifier", "target"),
)
K_CHOICES = range(1, 9)


# ---------------------------------------------------------------- the BRIEF's formulas


def expected_tokens(alpha: float, k: int) -> float:
    """E(alpha, k): tokens emitted per verification of k drafts with per-token acceptance alpha."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """S = E(alpha, k) / (k c + 1) for a two-level chain with c = t_draft / t_target."""
    return expected_tokens(alpha, k) / (k * cost_ratio + 1)


def chain_time_per_token(step_times: list[float], alphas: list[float], ks: list[int]) -> float:
    """tau_N for levels 1..N (bottom first): tau_1 = t_1, tau_{i+1} = (k_i tau_i + t_{i+1}) / E(alpha_i, k_i)."""
    tau = step_times[0]
    for t_next, alpha, k in zip(step_times[1:], alphas, ks):
        tau = (k * tau + t_next) / expected_tokens(alpha, k)
    return tau


def best_chain(step_times: list[float], alphas: list[float]) -> tuple[tuple[int, ...], float]:
    """The ks (one per lower level, each in 1..8) that minimise tau_N, and that tau_N."""
    options = itertools.product(K_CHOICES, repeat=len(alphas))
    return min(((ks, chain_time_per_token(step_times, alphas, list(ks))) for ks in options), key=lambda o: o[1])


# ---------------------------------------------------------------- measurements


def heldout_windows(tokenizer, domain: str, n: int, seq_len: int):
    """`n` evenly spaced windows of `seq_len` tokens over the held-out documents: LongTensor [n, seq_len]."""
    import torch

    from shared.models.corpus import documents
    from shared.models.tokenizer import encode_documents

    ids = [i for doc_ids in encode_documents(tokenizer, [d.text for d in documents(domain, "heldout")]) for i in doc_ids]
    stream = torch.tensor(ids, dtype=torch.long)
    if stream.numel() < seq_len + 1:
        raise ValueError(f"held-out {domain} text has only {stream.numel()} tokens")
    starts = torch.linspace(0, stream.numel() - seq_len - 1, n).long()
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def logits_on(model, windows, batch: int = 8):
    """Teacher-forced next-token logits of `model` on every window: float [n, seq_len, vocab]."""
    import torch

    with torch.no_grad():
        return torch.cat([model(input_ids=windows[i : i + batch]).logits.float() for i in range(0, len(windows), batch)])


def pair_stats(draft_logits, verify_logits) -> dict[str, float]:
    """Greedy agreement and mean `1 - TV(p, q)` between two models' next-token distributions."""
    import torch

    vocab = min(draft_logits.shape[-1], verify_logits.shape[-1])
    q = torch.softmax(draft_logits[..., :vocab], dim=-1)
    p = torch.softmax(verify_logits[..., :vocab], dim=-1)
    agreement = (q.argmax(-1) == p.argmax(-1)).float().mean().item()
    acceptance = torch.minimum(p, q).sum(-1).mean().item()
    return {"greedy_agreement": round(agreement, 4), "acceptance": round(acceptance, 4)}


def step_latency_ms(model, batch: int, context: int = 128, steps: int = 24, vocab: int = 256) -> float:
    """Median milliseconds of one KV-cached decoding step at `batch` after a `context`-token prefill."""
    import torch
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, context), generator=generator)
    times = []
    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times[2:]), 3)


def evaluate_family(family, windows: int = 32, seq_len: int = 128, latency: bool = True, progress: bool = False) -> dict:
    """Every measurement of `specmesh models eval`, as one JSON-ready dict."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from shared.models.corpus import DOMAINS
    from shared.models.tokenizer import load_tokenizer

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = load_tokenizer(family.path("target"))
        models = {name: AutoModelForCausalLM.from_pretrained(str(e.path)).eval() for name, e in family.models.items()}
        pairs = []
        for domain in tqdm(DOMAINS, desc="agreement", disable=not progress):
            data = heldout_windows(tokenizer, domain, windows, seq_len)
            logits = {name: logits_on(model, data) for name, model in models.items()}
            for draft, verify in PAIRS:
                pairs.append({"draft": draft, "verify": verify, "domain": domain, **pair_stats(logits[draft], logits[verify])})
        latencies = {}
        if latency:
            for name, model in tqdm(models.items(), desc="latency", disable=not progress):
                latencies[name] = {f"batch{b}_ms": step_latency_ms(model, b, vocab=len(tokenizer)) for b in (1, 8)}
        chains = _chains(pairs, latencies) if latency else []
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "profile": family.profile,
        "root": str(family.root),
        "threads": 1,
        "windows": {"per_domain": windows, "seq_len": seq_len},
        "models": {n: {"params": e.params, "domain": e.domain, "path": str(e.path)} for n, e in family.models.items()},
        "pairs": pairs,
        "latency": latencies,
        "chains": chains,
    }


def _chains(pairs: list[dict], latencies: dict) -> list[dict]:
    """Predicted speedup over the target alone of every chain, per domain, at batch 1."""
    by_pair = {(p["draft"], p["verify"], p["domain"]): p for p in pairs}
    rows = []
    for domain in sorted({p["domain"] for p in pairs}):
        for chain in CHAINS:
            times = [latencies[name]["batch1_ms"] for name in chain]
            row = {"domain": domain, "chain": list(chain), "step_ms": times}
            for label, field in (("sampling", "acceptance"), ("greedy", "greedy_agreement")):
                alphas = [by_pair[(low, high, domain)][field] for low, high in zip(chain, chain[1:])]
                ks, tau = best_chain(times, alphas)
                row[label] = {"alphas": alphas, "ks": list(ks), "ms_per_token": round(tau, 3), "speedup": round(times[-1] / tau, 3)}
            rows.append(row)
    return rows


def format_report(report: dict) -> str:
    """A plain-text table of `evaluate_family`'s result."""
    lines = [f"family {report['profile']} at {report['root']} (threads={report['threads']})", ""]
    lines.append(f"{'draft':<14} {'verify':<10} {'domain':<6} {'agreement':>9} {'1-TV':>7}")
    for p in report["pairs"]:
        lines.append(f"{p['draft']:<14} {p['verify']:<10} {p['domain']:<6} {p['greedy_agreement']:>9.3f} {p['acceptance']:>7.3f}")
    if report["latency"]:
        lines += ["", f"{'model':<14} {'params':>10} {'batch1 ms':>10} {'batch8 ms':>10}"]
        for name, lat in report["latency"].items():
            lines.append(f"{name:<14} {report['models'][name]['params']:>10,} {lat['batch1_ms']:>10.3f} {lat['batch8_ms']:>10.3f}")
        lines += ["", f"{'chain':<40} {'domain':<6} {'ks':<8} {'S sampling':>10} {'S greedy':>9}"]
        for c in report["chains"]:
            ks = ",".join(map(str, c["sampling"]["ks"]))
            lines.append(f"{' -> '.join(c['chain']):<40} {c['domain']:<6} {ks:<8} {c['sampling']['speedup']:>10.2f} {c['greedy']['speedup']:>9.2f}")
    return "\n".join(lines)

