"""Training loops: the target from the corpus (cross-entropy), the others distilled from it (KL).

The target trains first, on both domains, with most of the budget. Then every smaller model
that is still missing trains in one loop that runs the target once per batch: the verifier
on both domains, each drafter on its own domain only, all on the target's full next-token
distributions, `KL(p_target || q_student)`. Seeds are fixed; at most 2 torch threads.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from shared.models.profile import ModelSpec, Profile

MAX_THREADS = 2


@dataclass
class TokenStream:
    """One domain's training text as a single 1-D tensor of token ids (documents end in EOS)."""

    domain: str
    ids: object  # torch.LongTensor [n_tokens]

    def batch(self, size: int, seq_len: int, generator):
        """`size` random windows of `seq_len` tokens: LongTensor [size, seq_len]."""
        import torch

        starts = torch.randint(0, self.ids.numel() - seq_len - 1, (size,), generator=generator)
        return torch.stack([self.ids[s : s + seq_len] for s in starts.tolist()])


def set_threads() -> int:
    """Use at most MAX_THREADS torch threads (the machines have 2 cores); returns the count."""
    import os

    import torch

    threads = max(1, min(MAX_THREADS, os.cpu_count() or 1))
    torch.set_num_threads(threads)
    return threads


def build_model(spec: ModelSpec, profile: Profile, tokenizer, seed: int):
    """A freshly initialised `LlamaForCausalLM` for `spec`, deterministic for `seed`."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = spec.llama_config(
        vocab_size=len(tokenizer),
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id,
        max_positions=profile.max_positions,
    )
    return LlamaForCausalLM(config)


def _schedule(step: int, total: int, peak: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _refresh() -> float:
    """Seconds between progress-bar updates: live on a terminal, sparse in logs."""
    import sys

    return 0.5 if sys.stderr.isatty() else 15.0


def _optimizer(model, lr: float):
    import torch

    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)


def train_target(model, streams: dict[str, TokenStream], profile: Profile, seed: int, progress: bool = True) -> dict:
    """Train `model` in place on every domain (equal share per batch) with cross-entropy."""
    import torch
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(model, profile.target_lr)
    model.train()
    started, smoothed = time.perf_counter(), None
    bar = tqdm(range(profile.target_steps), desc="target", disable=not progress, unit="step", mininterval=_refresh())
    for step in bar:
        batch = torch.cat([streams[d].batch(profile.batch, profile.seq_len, generator) for d in sorted(streams)])
        for group in optimizer.param_groups:
            group["lr"] = _schedule(step, profile.target_steps, profile.target_lr)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.3f}", refresh=False)
    model.eval()
    return {"steps": profile.target_steps, "final_loss": round(smoothed, 4), "seconds": round(time.perf_counter() - started, 1)}


def distil(
    teacher,
    students: dict[str, tuple[object, ModelSpec]],
    streams: dict[str, TokenStream],
    profile: Profile,
    seed: int,
    progress: bool = True,
) -> dict[str, dict]:
    """Distil every student (name -> (model, spec)) from `teacher` on its own domains at once.

    Each step draws one batch per domain, runs the teacher once on it, and updates every
    student that trains on that domain with `KL(p_teacher || q_student)` per token.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    optimizers = {name: _optimizer(model, profile.distil_lr) for name, (model, _) in students.items()}
    smoothed: dict[str, float] = {}
    for model, _ in students.values():
        model.train()
    teacher.eval()
    domains = sorted({d for _, spec in students.values() for d in spec.domains})
    started = time.perf_counter()
    bar = tqdm(range(profile.distil_steps), desc="distil " + ",".join(students), disable=not progress, unit="step", mininterval=_refresh())
    for step in bar:
        batches = {d: streams[d].batch(profile.batch, profile.seq_len, generator) for d in domains}
        with torch.no_grad():
            teacher_logp = {d: F.log_softmax(teacher(input_ids=b).logits.float(), dim=-1) for d, b in batches.items()}
        lr = _schedule(step, profile.distil_steps, profile.distil_lr)
        for name, (model, spec) in students.items():
            inputs = torch.cat([batches[d] for d in spec.domains])
            target_logp = torch.cat([teacher_logp[d] for d in spec.domains])
            student_logp = F.log_softmax(model(input_ids=inputs).logits.float(), dim=-1)
            vocab = student_logp.shape[-1]
            loss = F.kl_div(student_logp.view(-1, vocab), target_logp.view(-1, vocab), log_target=True, reduction="batchmean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for group in optimizers[name].param_groups:
                group["lr"] = lr
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            smoothed[name] = loss.item() if name not in smoothed else 0.95 * smoothed[name] + 0.05 * loss.item()
        bar.set_postfix({f"kl[{name}]": f"{value:.3f}" for name, value in smoothed.items()}, refresh=False)
    seconds = round(time.perf_counter() - started, 1)
    for model, _ in students.values():
        model.eval()
    return {name: {"steps": profile.distil_steps, "final_kl": round(smoothed[name], 4), "seconds": seconds} for name in students}
