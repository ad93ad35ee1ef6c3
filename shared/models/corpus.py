"""The offline training corpora: *code* (the standard library's source) and *prose* (its words).

Every machine with CPython has them, so every machine can train the same family:

- code: every `*.py` under `sysconfig.get_paths()["stdlib"]`, sorted by relative path,
  except test suites, `site-packages`, the generated `encodings` tables, the
  machine-specific `_sysconfigdata*` and `pydoc_data` (which is prose);
- prose: the docstrings (`ast`) and full-line comments of those same files, the
  `pydoc_data.topics` help texts, and the interpreter's `LICENSE.txt` when present.

A file (or pydoc topic) belongs to the held-out split when the SHA-1 of its relative path
(or topic name) falls in the lowest `HELDOUT_PERCENT` of the hash space: the split never
depends on file order, contents or the machine.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DOMAINS = ("code", "prose")
SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 5
_EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"}
_COMMENT = re.compile(r"^[ \t]*#(?![!]) ?(.*)$")


@dataclass(frozen=True)
class Document:
    """One unit of text: a source file, the prose extracted from one, a help topic, a license."""

    name: str
    domain: str
    split: str
    text: str


def stdlib_root() -> Path:
    """The folder holding this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(name: str) -> str:
    """`"heldout"` for about HELDOUT_PERCENT% of names, chosen by hash; `"train"` otherwise."""
    bucket = int.from_bytes(hashlib.sha1(name.encode()).digest()[:4], "big") % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


@lru_cache(maxsize=4)
def source_files(root: Path | None = None) -> tuple[tuple[str, Path], ...]:
    """`(relative path, path)` of every code file of the corpus, sorted by relative path."""
    root = root or stdlib_root()
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _EXCLUDED_DIRS and not d.startswith("config-")]
        for file in files:
            if file.endswith(".py") and not file.startswith("_sysconfigdata"):
                path = Path(folder, file)
                found.append((path.relative_to(root).as_posix(), path))
    return tuple(sorted(found))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def prose_of_source(source: str) -> str:
    """Docstrings and full-line comments of one Python file, as paragraphs of plain text."""
    parts: list[str] = []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) > 20:
                    parts.append(doc)
    block: list[str] = []
    for line in source.splitlines():
        match = _COMMENT.match(line)
        if match:
            block.append(match.group(1).rstrip())
        elif block:
            text = " ".join(word for word in block if word).strip()
            if len(text) > 20 and not text.startswith(("-*-", "XXX", "TODO", "type:", "noqa", "pragma")):
                parts.append(text)
            block = []
    return "\n\n".join(parts)


@lru_cache(maxsize=8)
def documents(domain: str, split: str) -> tuple[Document, ...]:
    """Every document of one domain and split, in a fixed order."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    docs: list[Document] = []
    for rel, path in source_files():
        if split_of(rel) != split:
            continue
        source = _read(path)
        if not source or not source.strip():
            continue
        text = source if domain == "code" else prose_of_source(source)
        if text.strip():
            docs.append(Document(rel, domain, split, text))
    if domain == "prose":
        docs.extend(_pydoc_topics(split))
        license_path = stdlib_root() / "LICENSE.txt"
        text = _read(license_path) if license_path.is_file() else None
        if text and split_of("LICENSE.txt") == split:
            docs.append(Document("LICENSE.txt", domain, split, text))
    return tuple(docs)


def _pydoc_topics(split: str) -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it; the corpus hash records its absence
        return []
    return [
        Document(f"pydoc:{key}", "prose", split, topics[key])
        for key in sorted(topics)
        if split_of(f"pydoc:{key}") == split and topics[key].strip()
    ]


EXTRACTION_VERSION = 1  # bump when the rules above change: it is part of the corpus hash


def corpus_hash() -> str:
    """SHA-256 of the raw input files (code files, pydoc topics, license) and the rules.

    Reads bytes only (about 0.1 s), so a cached family is found without extracting prose.
    """
    root = stdlib_root()
    digest = hashlib.sha256(f"extraction-v{EXTRACTION_VERSION}\0".encode())
    inputs = [rel for rel, _ in source_files()] + ["pydoc_data/topics.py", "LICENSE.txt"]
    for rel in inputs:
        path = root / rel
        data = path.read_bytes() if path.is_file() else b"<absent>"
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def heldout_prompts(domain: str, n: int, prompt_chars: int = 200, seed: int = 0) -> list[str]:
    """`n` deterministic prompts of about `prompt_chars` characters from held-out text.

    Each prompt starts at the beginning of a line of a held-out document chosen by a
    `random.Random(seed)`; the same arguments always give the same prompts.
    """
    docs = [doc for doc in documents(domain, "heldout") if len(doc.text) >= prompt_chars + 1]
    if not docs:
        raise ValueError(f"no held-out {domain} document is longer than {prompt_chars} characters")
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        text = rng.choice(docs).text
        start = rng.randrange(0, len(text) - prompt_chars)
        line_start = text.rfind("\n", 0, start) + 1
        prompts.append(text[line_start : line_start + prompt_chars])
    return prompts
