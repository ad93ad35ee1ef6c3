"""`specmesh models list/eval` on the cached tiny family."""

import json

from typer.testing import CliRunner

from shared.cli.models_cmd import app


def test_list_json_names_every_member(tiny_family):
    result = CliRunner().invoke(app, ["list", "--json", "--profile", "tiny"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["models"]}
    assert set(rows) == set(tiny_family.models)
    for name, row in rows.items():
        assert row["path"] == str(tiny_family.path(name)) and row["params"] == tiny_family.models[name].params
        assert {"role", "domain"} <= set(row)


def test_eval_json_reports_pairs_latency_and_chains(tiny_family):
    result = CliRunner().invoke(app, ["eval", "--json", "--profile", "tiny", "--windows", "2", "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["pairs"]) == 10 and len(report["chains"]) == 10
    assert set(report["latency"]) == set(tiny_family.models)
    assert all(0 <= p["greedy_agreement"] <= 1 and 0 <= p["acceptance"] <= 1 for p in report["pairs"])
    assert all(c["sampling"]["speedup"] > 0 for c in report["chains"])
