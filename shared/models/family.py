"""The model family: which checkpoint folder plays which role, trained and cached on first use.

`ensure_family("tiny")` returns the cached family instantly, or trains it (tokenizer, target,
then the distilled verifier and drafters) into `<cache_dir>/<profile>-<sha12>/`, a folder
named by the hash of everything that decides the weights. `resolve_family(settings)` lets
explicit Hugging Face checkpoint folders replace any member. Every folder loads with
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.models.profile import Profile, get_profile

ROLES = ("target", "verifier", "drafter-code", "drafter-prose")
ALIASES = {"drafter": "drafter-code"}
DOMAIN_OF = {"target": "all", "verifier": "all", "drafter-code": "code", "drafter-prose": "prose"}
RECIPE_VERSION = 1  # bump when training code changes what a profile produces
MANIFEST = "family.json"
MODEL_CARD = "specmesh.json"


@dataclass(frozen=True)
class ModelEntry:
    """One member of a family: its name, role, checkpoint folder, domain and size."""

    name: str
    role: str  # one of ROLES
    path: Path
    domain: str  # "all" | "code" | "prose"
    params: int


@dataclass(frozen=True)
class Family:
    """Models sharing one tokenizer, by name."""

    root: Path
    profile: str
    models: dict[str, ModelEntry]

    def path(self, name: str) -> Path:
        """The checkpoint folder of `name` (aliases such as `drafter` accepted)."""
        return self.entry(name).path

    def entry(self, name: str) -> ModelEntry:
        """The `ModelEntry` of `name` (aliases accepted); `KeyError` listing valid names."""
        canonical = ALIASES.get(name, name)
        if canonical not in self.models:
            aliases = ", ".join(f"{a} -> {t}" for a, t in ALIASES.items())
            raise KeyError(f"unknown model {name!r}; valid names: {', '.join(self.models)} (aliases: {aliases})")
        return self.models[canonical]


class VocabularyMismatch(ValueError):
    """Models that do not share one vocabulary cannot speculate for each other."""


# ---------------------------------------------------------------- cache key and manifest


def family_key(profile: Profile) -> tuple[str, dict]:
    """The 12-hex cache key of `profile` on this machine, and what it hashes."""
    from shared.models.corpus import corpus_hash

    inputs = {
        "python": ".".join(map(str, sys.version_info[:3])),
        "implementation": sys.implementation.name,
        "corpus_sha256": corpus_hash(),
        "profile": profile.as_dict(),
        "seed": profile.seed,
        "recipe": RECIPE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return digest[:12], inputs


TARGET_INPUTS = ("vocab_size", "seq_len", "batch", "target_steps", "target_lr", "max_positions", "seed")


def target_key(inputs: dict) -> str:
    """The hash of what decides the tokenizer and the target alone (a family's `inputs`).

    Two families that differ only in what they distil (steps, student sizes) share it, so
    the second reuses the first's tokenizer and target instead of training them again.
    """
    profile = inputs["profile"]
    part = {k: v for k, v in inputs.items() if k != "profile"}
    part["target_profile"] = {k: profile[k] for k in TARGET_INPUTS}
    part["target_model"] = profile["models"]["target"]
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]


def _target_donor(root: Path, inputs: dict) -> Path | None:
    """A finished family beside `root` with the same target key (its target can be copied)."""
    wanted = target_key(inputs)
    for manifest in sorted(root.parent.glob(f"*/{MANIFEST}")):
        other = manifest.parent
        if other == root or not (other / "target" / MODEL_CARD).is_file():
            continue
        try:
            if target_key(json.loads(manifest.read_text())["inputs"]) == wanted:
                return other
        except (KeyError, ValueError, TypeError):
            continue
    return None


def default_cache_dir() -> Path:
    """`settings.models.cache_dir` (`SPECMESH_MODELS__CACHE_DIR`), `~/.cache/specmesh/models` by default."""
    from shared.settings import get_settings

    return Path(get_settings().models.cache_dir).expanduser()


def family_root(profile: str = "tiny", cache_dir: Path | None = None) -> Path:
    """The folder `ensure_family(profile, cache_dir)` uses, trained or not."""
    spec = get_profile(profile)
    key, _ = family_key(spec)
    return Path(cache_dir or default_cache_dir()).expanduser() / f"{spec.name}-{key}"


def load_family(root: Path) -> Family:
    """The family described by `root/family.json`."""
    manifest = json.loads((root / MANIFEST).read_text())
    models = {
        name: ModelEntry(name=name, role=m["role"], path=root / m["path"], domain=m["domain"], params=m["params"])
        for name, m in manifest["models"].items()
    }
    return Family(root=root, profile=manifest["profile"], models=models)


@contextmanager
def _locked(lock_path: Path):
    """Hold an exclusive lock so that two processes never train the same family at once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished folder into place atomically (another process may have won the race)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _save_model(model, tokenizer, root: Path, name: str, card: dict) -> None:
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / MODEL_CARD).write_text(json.dumps(card, indent=2) + "\n")
    _publish(tmp, root / name)


# ---------------------------------------------------------------- training a family


def ensure_family(profile: str = "tiny", cache_dir: Path | None = None, progress: bool = True) -> Family:
    """The trained family of `profile`: instant when cached, otherwise trained now (tqdm bars).

    Resumable: the tokenizer and each finished model are kept, so an interrupted run
    continues where it stopped; `family.json` is written last.
    """
    spec = get_profile(profile)
    key, inputs = family_key(spec)
    root = Path(cache_dir or default_cache_dir()).expanduser() / f"{spec.name}-{key}"
    if (root / MANIFEST).is_file():
        return load_family(root)
    with _locked(root.with_name(root.name + ".lock")):
        if (root / MANIFEST).is_file():  # trained by another process while we waited
            return load_family(root)
        root.mkdir(parents=True, exist_ok=True)
        _train_family(spec, root, key, inputs, progress)
    return load_family(root)


def _train_family(spec: Profile, root: Path, key: str, inputs: dict, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from shared.models import corpus
    from shared.models.tokenizer import encode_documents, load_tokenizer, train_tokenizer
    from shared.models.train import TokenStream, build_model, distil, set_threads, train_target

    started = time.perf_counter()
    threads = set_threads()
    seconds: dict[str, float] = {}
    donor = _target_donor(root, inputs) if not (root / "target" / MODEL_CARD).is_file() else None
    if donor is not None:  # same tokenizer and target: copy them, distil only
        for name in ("tokenizer", "target"):
            tmp = root / f".tmp-{name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(donor / name, tmp)
            _publish(tmp, root / name)
        if progress:
            print(f"reusing tokenizer and target from {donor} (same target key {target_key(inputs)})", file=sys.stderr)
    texts = {d: [doc.text for doc in corpus.documents(d, "train")] for d in corpus.DOMAINS}

    if not (root / "tokenizer" / "tokenizer.json").is_file():
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(texts["code"] + texts["prose"], spec.vocab_size, threads)
        tmp = root / f".tmp-tokenizer-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tokenizer.save_pretrained(str(tmp))
        _publish(tmp, root / "tokenizer")
        seconds["tokenizer"] = round(time.perf_counter() - t0, 1)
    tokenizer = load_tokenizer(root / "tokenizer")

    t0 = time.perf_counter()
    streams = {
        d: TokenStream(d, torch.tensor([i for ids in encode_documents(tokenizer, texts[d]) for i in ids], dtype=torch.long))
        for d in corpus.DOMAINS
    }
    seconds["encode"] = round(time.perf_counter() - t0, 1)

    def card(name: str, model, training: dict) -> dict:
        return {
            "name": name,
            "role": name,
            "domain": DOMAIN_OF[name],
            "params": sum(p.numel() for p in model.parameters()),
            "profile": spec.name,
            "family_key": key,
            "training": training,
        }

    if (root / "target" / MODEL_CARD).is_file():
        target = AutoModelForCausalLM.from_pretrained(str(root / "target")).eval()
    else:
        target = build_model(spec.models["target"], spec, tokenizer, seed=spec.seed)
        stats = train_target(target, streams, spec, seed=spec.seed, progress=progress)
        _save_model(target, tokenizer, root, "target", card("target", target, stats))
        seconds["target"] = stats["seconds"]

    missing = [name for name in ROLES[1:] if not (root / name / MODEL_CARD).is_file()]
    if missing:
        students = {
            name: (build_model(spec.models[name], spec, tokenizer, seed=spec.seed + 1 + ROLES.index(name)), spec.models[name])
            for name in missing
        }
        stats = distil(target, students, streams, spec, seed=spec.seed + 100, progress=progress)
        for name, (model, _) in students.items():
            _save_model(model, tokenizer, root, name, card(name, model, {**stats[name], "teacher": "target"}))
        seconds["distil"] = stats[missing[0]]["seconds"]

    models = {}
    for name in ROLES:
        model_card = json.loads((root / name / MODEL_CARD).read_text())
        models[name] = {"role": name, "path": name, "domain": DOMAIN_OF[name], "params": model_card["params"], "training": model_card["training"]}
    manifest = {
        "profile": spec.name,
        "key": key,
        "inputs": inputs,
        "vocab_size": len(tokenizer),
        "threads": threads,
        "seconds": {**seconds, "total_this_run": round(time.perf_counter() - started, 1)},
        "models": models,
    }
    tmp = root / f".{MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)


# ---------------------------------------------------------------- explicit folders and vocabularies


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each weight's name and shape in a checkpoint folder's safetensors files (read from
    their headers: nothing is loaded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        shapes.update((name, tuple(t["shape"])) for name, t in header.items() if name != "__metadata__")
    return shapes


def param_count(shapes: dict[str, tuple[int, ...]]) -> int:
    """Parameters in weights of these shapes."""
    return sum(math.prod(shape) for shape in shapes.values())


def count_params(path: Path) -> int:
    """Parameters stored in a checkpoint folder's safetensors files (read from their headers)."""
    return param_count(checkpoint_shapes(path))


def resolve_family(settings) -> Family:
    """The family the settings name: the trained profile, with explicit folders replacing members.

    `settings.models.{target,verifier,drafter_code,drafter_prose}` are HF checkpoint folders;
    when all four are given nothing is trained. Members that do not share the vocabulary
    are refused with `VocabularyMismatch`.
    """
    m = settings.models
    given = {
        name: Path(folder).expanduser().resolve()
        for name, folder in (("target", m.target), ("verifier", m.verifier), ("drafter-code", m.drafter_code), ("drafter-prose", m.drafter_prose))
        if folder is not None
    }
    for name, folder in given.items():
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"the {name} checkpoint folder {folder} has no config.json (expected a Hugging Face model folder)")
    if len(given) == len(ROLES):
        base = None
        models: dict[str, ModelEntry] = {}
    else:
        base = ensure_family(m.profile, m.cache_dir)
        models = dict(base.models)
    for name, folder in given.items():
        models[name] = ModelEntry(name=name, role=name, path=folder, domain=DOMAIN_OF[name], params=count_params(folder))
    if given:
        check_same_vocabulary([models[name].path for name in ROLES])
    if base is None:
        return Family(root=Path(os.path.commonpath([str(e.path) for e in models.values()])), profile="custom", models=models)
    return Family(root=base.root, profile=base.profile if not given else f"{base.profile}+custom", models=models)


def _file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def check_same_vocabulary(paths: list[Path]) -> None:
    """Raise `VocabularyMismatch` unless every folder's tokenizer maps the same tokens to the same ids."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        return
    digests = {_file_digest(p / "tokenizer.json") for p in paths}
    if len(digests) == 1 and None not in digests:
        return  # byte-identical tokenizers
    from transformers import AutoConfig, AutoTokenizer

    described, fingerprints = [], set()
    for path in paths:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        vocab = tokenizer.get_vocab()
        fingerprint = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:12]
        fingerprints.add(fingerprint)
        model_vocab = AutoConfig.from_pretrained(str(path)).vocab_size
        described.append(
            f"  {path}: {type(tokenizer).__name__} with {len(vocab)} tokens (vocabulary {fingerprint}), model vocab_size {model_vocab}"
        )
    if len(fingerprints) > 1:
        raise VocabularyMismatch(
            "these models do not share one vocabulary, so none can draft or verify for another:\n"
            + "\n".join(described)
            + "\nUse checkpoints from one family (same tokenizer), e.g. `specmesh models train --profile tiny`."
        )
