"""Request classes: held-out code is mostly classed as code, held-out prose as prose."""

from shared.models.corpus import heldout_prompts
from shared.request_class import CLASSES, classify, domain


def test_domains_of_heldout_text():
    code = [domain(t) for t in heldout_prompts("code", 40, 200)]
    prose = [domain(t) for t in heldout_prompts("prose", 40, 200)]
    # Measured 2026-11-22: 0.875 of code and 0.80 of prose prompts classed right.
    assert code.count("code") / len(code) >= 0.75
    assert prose.count("prose") / len(prose) >= 0.70


def test_classes_and_length_buckets():
    assert classify("def f(x):\n    return x\n", 5) == "code-short"
    assert classify("The quick brown fox jumps over the lazy dog.", 500) == "prose-long"
    assert classify("", 0) == "prose-short"
    assert set(CLASSES) == {"code-short", "code-long", "prose-short", "prose-long"}
