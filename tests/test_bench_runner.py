"""`specmesh bench runner`: both runners on a checkpoint, by batch size, the same tokens;
the lean runner reported as skipped where it does not take the architecture."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from shared.cli.main import app
from tests.test_engine_runner import _save


def _bench(*args: str, err: bool = False) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["bench", "runner", *args])
    return result.exit_code, result.stderr if err else result.stdout


def test_both_runners_by_batch_give_the_same_tokens(tmp_path):
    path = _save(tmp_path, "qwen3", head_dim=24)
    code, out = _bench("--checkpoint", str(path), "--batches", "2,1", "--prompt-tokens", "12", "--max-tokens", "5",
                       "--threads", "1", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert [(r["runner"], r["batch"]) for r in result["rows"]] == [("lean", 1), ("lean", 2), ("hf", 1), ("hf", 2)]
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert result["identical"] is True and result["skipped"] == {} and result["model_type"] == "qwen3"


def test_an_architecture_the_lean_runner_refuses_runs_on_transformers_only(tmp_path):
    path = _save(tmp_path, "gpt_neox")
    code, out = _bench("--checkpoint", str(path), "--batches", "1,3", "--prompt-tokens", "6", "--max-tokens", "3",
                       "--threads", "1")
    assert code == 0, out
    assert "lean: not run (model type 'gpt_neox' is not one of" in out
    assert "identical tokens across runners: True" in out and out.count("\nhf ") == 2


def test_bad_arguments_are_refused_clearly(tmp_path):
    code, out = _bench("--checkpoint", str(tmp_path), "--batches", "1", err=True)
    assert code == 2 and "not a transformers checkpoint folder" in out
    code, out = _bench("--checkpoint", str(tmp_path), "--batches", "1,x", err=True)
    assert code == 2 and "--batches takes positive whole numbers" in out
    code, out = _bench("--checkpoint", str(tmp_path), "--dtype", "int8", err=True)
    assert code == 2 and "--dtype must be one of" in out
