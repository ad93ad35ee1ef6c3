"""Shared pytest fixtures. The real-stack fixtures live in tests/stack_fixtures.py."""

import pytest

pytest_plugins = ["tests.stack_fixtures"]


@pytest.fixture(scope="session")
def tiny_family():
    """The `tiny` model family from the default cache (trained on first use, ~2-3 min on 2 cores)."""
    from shared.models.family import ensure_family

    return ensure_family("tiny", progress=False)
