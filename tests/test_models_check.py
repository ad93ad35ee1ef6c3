"""`specmesh models check`: the settings' models as the services will take them, read from
their configs and safetensors headers; problems named, exit status 1."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from shared.cli.main import app
from shared.settings import get_settings
from tests.test_custom_checkpoints import GENERATION, write_folders


@pytest.fixture
def check(monkeypatch):
    def run(env: dict[str, str], *args: str):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(app, ["models", "check", *args])
        finally:
            get_settings.cache_clear()
        return result
    yield run
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def folders(tiny_family, tmp_path_factory):
    paths, _ = write_folders(tmp_path_factory.mktemp("check"), tiny_family.path("target"))
    return {f"SPECMESH_MODELS__{role.upper().replace('-', '_')}": str(path) for role, path in paths.items()}


def test_the_trained_family_passes(check, tiny_family):
    result = check({"SPECMESH_MODELS__PROFILE": "tiny"}, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [m["name"] for m in report["models"]] == ["target", "verifier", "drafter-code", "drafter-prose"]
    assert {m["runner"] for m in report["models"]} == {"lean"} and report["problems"] == []
    target = report["models"][0]
    assert target["params"] == tiny_family.models["target"].params and target["weights_bytes"] == 4 * target["params"]


def test_explicit_folders_say_which_runner_and_what_the_target_recommends(check, folders):
    result = check(folders, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    runners = {m["name"]: (m["model_type"], m["runner"]) for m in report["models"]}
    assert runners == {"target": ("qwen3", "lean"), "verifier": ("gemma3_text", "lean"), "drafter-code": ("phi3", "lean"),
                       "drafter-prose": ("gpt_neox", "hf")}
    assert "'gpt_neox' is not one of" in report["models"][3]["runner_reason"]
    assert report["sampling"]["defaults"] == GENERATION and report["chat_template"].startswith("the family's")
    table = check(folders | {"SPECMESH_ENGINE__DTYPE": "bfloat16"})
    assert table.exit_code == 0 and "drafter-prose runs on transformers: model type 'gpt_neox'" in table.stdout
    assert "temperature=0.7, top_p=0.9, top_k=12" in table.stdout


def test_problems_are_named_and_fail_the_check(check, folders, tmp_path):
    result = check(folders | {"SPECMESH_ENGINE__MAX_LEN": "2048"}, "--json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["problems"]
    assert len(problems) == 4 and problems[0].startswith("target: engine.max_len=2048 is longer than its context (1024")
    other = tmp_path / "other"
    shutil.copytree(folders["SPECMESH_MODELS__VERIFIER"], other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two tokens' ids swapped: another vocabulary
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    result = check(folders | {"SPECMESH_MODELS__VERIFIER": str(other)})
    assert result.exit_code == 1 and "error:" in result.stderr and str(other) in result.stderr
