"""The model family SpecMesh trains offline, caches, and loads like any Hugging Face checkpoint.

`ensure_family("tiny")` trains or finds it; `resolve_family(settings)` applies explicit folders.
"""

from shared.models.family import (
    ALIASES,
    ROLES,
    Family,
    ModelEntry,
    VocabularyMismatch,
    check_same_vocabulary,
    ensure_family,
    resolve_family,
)

__all__ = [
    "ALIASES",
    "ROLES",
    "Family",
    "ModelEntry",
    "VocabularyMismatch",
    "check_same_vocabulary",
    "ensure_family",
    "resolve_family",
]
