"""The family on disk: HF round trip, aliases, cache hits, resumable training, vocabulary checks."""

import json
import shutil
from pathlib import Path

import pytest

from shared.models import family as fam
from shared.models.family import ALIASES, ROLES, VocabularyMismatch, check_same_vocabulary, ensure_family
from shared.models.profile import PROFILES, ModelSpec, Profile


def test_every_member_loads_through_auto_classes(tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert set(tiny_family.models) == set(ROLES)
    for name, entry in tiny_family.models.items():
        model = AutoModelForCausalLM.from_pretrained(str(entry.path))
        tok = AutoTokenizer.from_pretrained(str(entry.path))
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.config.tie_word_embeddings and model.config.max_position_embeddings >= 1024
        assert model.config.vocab_size == len(tok) and tok.eos_token_id is not None
        assert entry.params == sum(p.numel() for p in model.parameters()) == fam.count_params(entry.path)
        assert entry.role == name and entry.domain == fam.DOMAIN_OF[name]
    params = {n: e.params for n, e in tiny_family.models.items()}
    assert params["target"] > params["verifier"] > params["drafter-code"]


def test_save_load_round_trip_keeps_logits(tiny_family, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_family.path("drafter"))).eval()
    model.save_pretrained(str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_path_accepts_aliases_and_names_valid_models(tiny_family):
    assert tiny_family.path("drafter") == tiny_family.path(ALIASES["drafter"])
    with pytest.raises(KeyError, match="drafter-prose"):
        tiny_family.path("drafter-lisp")


def test_cache_hit_neither_retrains_nor_rewrites(tiny_family, monkeypatch):
    watched = [tiny_family.root / fam.MANIFEST] + [e.path / "model.safetensors" for e in tiny_family.models.values()]
    before = [p.stat().st_mtime_ns for p in watched]

    def refuse(*args, **kwargs):
        raise AssertionError("a cached family was trained again")

    monkeypatch.setattr(fam, "_train_family", refuse)
    again = ensure_family("tiny", progress=False)
    assert again == tiny_family
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_mismatched_vocabulary_is_refused(tiny_family, tmp_path):
    from shared.models.tokenizer import train_tokenizer

    odd = tmp_path / "odd-drafter"
    shutil.copytree(tiny_family.path("drafter"), odd)
    for file in odd.glob("*token*"):
        file.unlink()
    odd_tokenizer = train_tokenizer(["def f(x):\n    return x\n" * 50, "Some prose words. " * 50], vocab_size=300)
    odd_tokenizer.save_pretrained(str(odd))
    check_same_vocabulary([tiny_family.path("target"), tiny_family.path("verifier")])  # same family: fine
    with pytest.raises(VocabularyMismatch) as error:
        check_same_vocabulary([tiny_family.path("target"), odd])
    message = str(error.value)
    assert str(odd) in message and str(tiny_family.path("target")) in message
    assert "2048 tokens" in message and f"{len(odd_tokenizer)} tokens" in message


def test_explicit_folders_override_the_profile(tiny_family, tmp_path):
    from shared.settings import ModelSettings, Settings

    copy = tmp_path / "my-drafter"
    shutil.copytree(tiny_family.path("drafter-prose"), copy)
    settings = Settings(models=ModelSettings(profile="tiny", cache_dir=tiny_family.root.parent, drafter_prose=copy))
    family = fam.resolve_family(settings)
    assert family.path("drafter-prose") == copy.resolve()
    assert family.path("target") == tiny_family.path("target")

    folders = {name.replace("-", "_"): tiny_family.path(name) for name in ROLES}
    custom = fam.resolve_family(Settings(models=ModelSettings(**folders)))
    assert custom.profile == "custom" and custom.path("verifier") == tiny_family.path("verifier").resolve()

    with pytest.raises(FileNotFoundError, match="config.json"):
        fam.resolve_family(Settings(models=ModelSettings(target=tmp_path / "missing")))


def test_training_is_resumable_and_publishes_atomically(tmp_path, monkeypatch):
    """A micro profile trains in seconds; a deleted member is retrained alone."""
    tiny_spec = ModelSpec(hidden=32, layers=1, heads=2, ffn=64, domains=("code", "prose"))
    micro = Profile(
        name="micro", vocab_size=512, seq_len=32, batch=2, target_steps=3, target_lr=1e-3, distil_steps=2, distil_lr=1e-3,
        models={
            "target": ModelSpec(hidden=48, layers=1, heads=2, ffn=96, domains=("code", "prose")),
            "verifier": tiny_spec,
            "drafter-code": ModelSpec(hidden=32, layers=1, heads=2, ffn=64, domains=("code",)),
            "drafter-prose": ModelSpec(hidden=32, layers=1, heads=2, ffn=64, domains=("prose",)),
        },
    )
    monkeypatch.setitem(PROFILES, "micro", micro)
    from shared.models import corpus

    every_document = corpus.documents
    monkeypatch.setattr(corpus, "documents", lambda domain, split: every_document(domain, split)[:12])
    family = ensure_family("micro", cache_dir=tmp_path, progress=False)
    assert family.root.parent == tmp_path and family.root.name.startswith("micro-")
    assert not list(family.root.glob(".tmp-*"))
    manifest = json.loads((family.root / fam.MANIFEST).read_text())
    assert manifest["inputs"]["profile"]["name"] == "micro" and manifest["vocab_size"] == 512

    target_mtime = (family.path("target") / "model.safetensors").stat().st_mtime_ns
    shutil.rmtree(family.path("drafter-prose"))
    (family.root / fam.MANIFEST).unlink()
    distilled = []
    import shared.models.train as train

    real_distil = train.distil

    def spy(teacher, students, *args, **kwargs):
        distilled.append(sorted(students))
        return real_distil(teacher, students, *args, **kwargs)

    monkeypatch.setattr(train, "distil", spy)
    monkeypatch.setattr(train, "train_target", lambda *a, **k: pytest.fail("the finished target was retrained"))
    again = ensure_family("micro", cache_dir=tmp_path, progress=False)
    assert distilled == [["drafter-prose"]]
    assert (again.path("target") / "model.safetensors").stat().st_mtime_ns == target_mtime
    assert (again.path("drafter-prose") / "config.json").is_file()


    # A profile that differs only in what it distils reuses the tokenizer and the target.
    import dataclasses

    monkeypatch.setitem(PROFILES, "micro", dataclasses.replace(micro, distil_steps=3))
    distilled.clear()
    longer = ensure_family("micro", cache_dir=tmp_path, progress=False)
    assert longer.root != again.root
    assert distilled == [["drafter-code", "drafter-prose", "verifier"]]
    assert (longer.path("target") / "model.safetensors").read_bytes() == (again.path("target") / "model.safetensors").read_bytes()
    manifest = json.loads((longer.root / fam.MANIFEST).read_text())
    assert fam.target_key(manifest["inputs"]) == fam.target_key(json.loads((again.root / fam.MANIFEST).read_text())["inputs"])
    # A different target is trained, not copied.
    monkeypatch.setitem(PROFILES, "micro", dataclasses.replace(micro, target_steps=4))
    with pytest.raises(pytest.fail.Exception, match="retrained"):
        ensure_family("micro", cache_dir=tmp_path, progress=False)


def test_unknown_profile_names_the_valid_ones():
    with pytest.raises(KeyError, match="tiny, small, bench"):
        ensure_family("huge", cache_dir=Path("/nonexistent"))
