"""A user's own checkpoints through the whole stack: the four roles from explicit folders
(`SPECMESH_MODELS__TARGET` ...), of architectures the family does not use.

A Qwen3 target, a Gemma 3 verifier (the lean runner, a sliding window shorter than the
prompts), a Phi-3 code drafter (lean, fused weights and partial rotary dimensions) and a
GPT-NeoX (Pythia) prose drafter (the lean runner refuses it: its worker runs transformers'
batched forward), random weights over the tiny family's tokenizer. The target's generation_config.json recommends sampling settings and lists a
second end token. The target reads prompts 8 tokens a round (chunked prefill). Through
real NATS and PostgreSQL: every chain gives the target alone's
tokens, greedy and seeded; a request that leaves the sampling fields out is sampled with
the checkpoint's; the second end token stops a request.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch

from tests.stack_fixtures import specmesh, stack_env

pytestmark = pytest.mark.stack

GENERATION = {"temperature": 0.7, "top_p": 0.9, "top_k": 12}
CHAINS = ["target", "drafter,target", "drafter-prose,target", "drafter,verifier,target", "ngram,drafter-prose,target",
          "fused,target"]


def _checkpoint(folder, tokenizer_from, arch: str, seed: int, **config) -> None:
    import transformers

    prefix = {"qwen3": "Qwen3", "phi3": "Phi3", "gemma3": "Gemma3Text", "gpt_neox": "GPTNeoX"}[arch]
    Config = getattr(transformers, f"{prefix}Config")
    Model = getattr(transformers, f"{prefix.removesuffix('Text')}ForCausalLM")
    tok = json.loads((tokenizer_from / "config.json").read_text())
    torch.manual_seed(seed)
    cfg = Config(vocab_size=tok["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 bos_token_id=tok["bos_token_id"], eos_token_id=tok["eos_token_id"], pad_token_id=tok["pad_token_id"],
                 tie_word_embeddings=False, **config)
    model = Model(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)  # sharp enough that the drafters' argmaxes sometimes agree
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)


def write_folders(root, family_target) -> tuple[dict, int]:
    """The four roles' folders under `root` (see the module's doc), and the target's second end token."""
    folders = {role: root / role for role in ("target", "verifier", "drafter-code", "drafter-prose")}
    _checkpoint(folders["target"], family_target, "qwen3", 0, head_dim=24)
    _checkpoint(folders["verifier"], family_target, "gemma3", 3, head_dim=16, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"])
    _checkpoint(folders["drafter-code"], family_target, "phi3", 1, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    _checkpoint(folders["drafter-prose"], family_target, "gpt_neox", 2)
    eos = json.loads((family_target / "config.json").read_text())["eos_token_id"]
    end = 7 if eos != 7 else 8  # a second end token, in the generation config only
    gen = json.loads((folders["target"] / "generation_config.json").read_text())
    gen |= GENERATION | {"eos_token_id": [eos, end]}
    (folders["target"] / "generation_config.json").write_text(json.dumps(gen))
    return folders, end


@pytest.fixture(scope="module")
def custom(tiny_family, tmp_path_factory):
    """`specmesh up` over the four folders; yields (gateway URL, target folder, end token)."""
    root = tmp_path_factory.mktemp("custom")
    folders, end = write_folders(root, tiny_family.path("target"))
    env = stack_env(root / ".run") | {
        "SPECMESH_MODELS__TARGET": str(folders["target"]), "SPECMESH_MODELS__VERIFIER": str(folders["verifier"]),
        "SPECMESH_MODELS__DRAFTER_CODE": str(folders["drafter-code"]),
        "SPECMESH_MODELS__DRAFTER_PROSE": str(folders["drafter-prose"]),
        "SPECMESH_ENGINE__PREFILL_CHUNK": "8",  # the 30-token prompts are read in chunks (chunked prefill)
    }
    try:
        specmesh(env, "up", timeout=900)
        yield f"http://127.0.0.1:{env['SPECMESH_GATEWAY__PORT']}", folders["target"], end
    finally:
        specmesh(env, "down", "--purge", check=False)


def _alone(folder, prompts, max_tokens, **sampling):
    from shared.engine.chain import Chain
    from shared.engine.runner import load_runner
    from shared.engine.sampling import SamplingParams

    target = load_runner(folder, max_len=256)
    return [Chain([("target", target)]).generate([p], max_tokens, SamplingParams(**sampling))[0] for p in prompts]


def _complete(url, prompt, chain=None, **fields) -> dict:
    """The choice, with the response's speculation report."""
    body = {"model": "specmesh", "prompt": prompt, "return_token_ids": True, **fields}
    if chain:
        body["speculation"] = {"chain": chain, "k": 3}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0] | {"speculation": r.json()["speculation"]}


def test_every_chain_over_qwen3_gemma3_phi3_and_gpt_neox_is_the_qwen3_targets_own(custom):
    url, target, end = custom
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(10, 2000, (n,), generator=gen).tolist() for n in (9, 30)]
    greedy = _alone(target, prompts, 16, temperature=0.0)
    seeded = _alone(target, prompts, 16, temperature=0.8, seed=3, top_p=GENERATION["top_p"], top_k=GENERATION["top_k"])
    for chain in CHAINS:
        drafted = 0
        for p, want_greedy, want_seeded in zip(prompts, greedy, seeded):
            got = _complete(url, p, chain, max_tokens=16, temperature=0)
            assert got["token_ids"] == want_greedy, chain
            assert got["speculation"]["chain"] == chain.split(","), (chain, got["speculation"])  # no level went missing
            drafted += sum(level["drafted"] for level in got["speculation"]["levels"])
            # top_p and top_k left out: the checkpoint's
            assert _complete(url, p, chain, max_tokens=16, temperature=0.8, seed=3)["token_ids"] == want_seeded, chain
        assert drafted > 0 or chain == "target", chain


def test_the_checkpoints_generation_config_sets_the_defaults_and_its_end_tokens_stop(custom):
    url, target, end = custom
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, 2000, (12,), generator=gen).tolist() for _ in range(3)]
    recommended = _alone(target, prompts, 20, seed=9, **GENERATION)
    for p, want in zip(prompts, recommended):  # no temperature, top_p or top_k in the request
        assert _complete(url, p, "drafter,target", max_tokens=20, seed=9)["token_ids"] == want
    # the second end token (the generation config's only) ends the output, unless ignore_eos
    biased = _complete(url, prompts[0], "drafter,target", max_tokens=20, temperature=0, logit_bias={str(end): 100})
    assert biased["token_ids"] == [end] and biased["finish_reason"] == "stop"
    kept = _complete(url, prompts[0], "drafter,target", max_tokens=5, temperature=0, logit_bias={str(end): 100},
                     ignore_eos=True)
    assert kept["token_ids"] == [end] * 5 and kept["finish_reason"] == "length"
