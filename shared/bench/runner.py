"""The runner benchmark: one checkpoint, the lean runner beside transformers', by batch size.

A checkpoint a user brings (or the family's target) decodes the same random prompts
greedily, as the target alone, at each batch size on each runner: the lean one when it
takes the architecture, and the transformers one (a batch per forward). Reported per
runner and batch: output tokens per second over the whole generation (prefill included)
and whether every runner gave the same tokens (they must, in float32).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from shared.engine.chain import Chain
from shared.engine.llama import UnsupportedModel
from shared.engine.runner import DTYPES, HFRunner, LeanRunner, load_hf_model


def random_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of `length` token ids drawn uniformly (no special tokens' low ids)."""
    gen = torch.Generator().manual_seed(seed)
    low = min(3, vocab - 1)
    return [torch.randint(low, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def run_runner_bench(path: str | Path, batches: Sequence[int], prompt_tokens: int, max_tokens: int,
                     device: str = "cpu", dtype: str = "float32", progress: Callable[[], None] | None = None) -> dict:
    """Tokens/s per runner and batch size for the checkpoint at `path` (see the module doc)."""
    torch_dtype = DTYPES[dtype]
    model = load_hf_model(path, torch_dtype)
    vocab = model.config.vocab_size
    max_len = prompt_tokens + max_tokens + 1
    runners: dict[str, object] = {}
    skipped: dict[str, str] = {}
    try:
        runners["lean"] = LeanRunner(model, device, torch_dtype, max(batches), max_len)
    except UnsupportedModel as exc:
        skipped["lean"] = str(exc)
    runners["hf"] = HFRunner(load_hf_model(path, torch_dtype), device, torch_dtype, max(batches), max_len)
    prompts = random_prompts(vocab, max(batches), prompt_tokens)
    rows, outputs = [], {}
    for name, runner in runners.items():
        Chain([("target", runner)]).generate(prompts[:1], 2, stop_at_eos=False)  # warm up
        for batch in batches:
            chain = Chain([("target", runner)])
            t0 = time.perf_counter()
            out = chain.generate(prompts[:batch], max_tokens, stop_at_eos=False)
            seconds = time.perf_counter() - t0
            outputs[(name, batch)] = out
            rows.append({"runner": name, "batch": batch, "seconds": round(seconds, 4),
                         "tokens_per_s": round(batch * max_tokens / seconds, 2)})
            if progress:
                progress()
    reference = {b: outputs[("hf", b)] for b in batches}
    identical = all(out == reference[b] for (_, b), out in outputs.items())
    return {"checkpoint": str(path), "model_type": model.config.model_type, "vocab_size": vocab,
            "parameters": sum(p.numel() for p in model.parameters()), "device": device, "dtype": dtype,
            "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "rows": rows, "skipped": skipped,
            "identical": identical}
