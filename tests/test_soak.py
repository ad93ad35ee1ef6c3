"""`specmesh bench soak` on the real stack: a short run with no errors and memory per process."""

from __future__ import annotations

import json

import pytest

from shared.cli.soak_bench import percentile
from shared.settings import SERVICES

pytestmark = pytest.mark.stack


def test_percentile_interpolates():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([10.0, 0.0], 100) == 10.0


def test_short_soak_has_no_errors(stack):
    from tests.stack_fixtures import specmesh

    env, _ = stack
    out = specmesh(env, "bench", "soak", "--streams", "2", "--minutes", "0.1", "--warmup-s", "2",
                   "--max-tokens", "8", "--json", timeout=120)
    report = json.loads(out.stdout[out.stdout.index("{"):])
    assert report["errors"] == 0, report["first_errors"]
    assert report["requests"] > 0
    assert set(SERVICES) <= set(report["memory_mib"])
    assert all(m["end"] > 0 for m in report["memory_mib"].values())
