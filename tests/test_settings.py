"""Settings come from SPECMESH_ variables, nested with `__`, and bad values are refused clearly."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.cli.config_cmd import settings_table
from shared.settings import Settings


def test_nested_environment(monkeypatch):
    monkeypatch.setenv("SPECMESH_NATS__PORT", "24222")
    monkeypatch.setenv("SPECMESH_ENGINE__THREADS", "2")
    settings = Settings()
    assert settings.nats.client_url == "nats://127.0.0.1:24222"
    assert settings.engine.threads == 2


def test_defaults_avoid_standard_ports():
    settings = Settings()
    assert settings.nats.port != 4222 and settings.database.port != 5432


def test_bad_port_is_refused(monkeypatch):
    monkeypatch.setenv("SPECMESH_NATS__PORT", "99999")
    with pytest.raises(ValidationError, match="less than or equal to 65535"):
        Settings()


def test_table_lists_every_setting():
    names = {row[0] for row in settings_table()}
    assert {"SPECMESH_NATS__PORT", "SPECMESH_DATABASE__URL", "SPECMESH_ENGINE__THREADS", "SPECMESH_RUN_DIR"} <= names


def test_readme_documents_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [var for var, _, _ in settings_table() if f"`{var}`" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"


def test_cpu_pinning_lists_are_parsed_and_checked(monkeypatch):
    from typer.testing import CliRunner

    from shared.cli.main import app
    from shared.settings import get_settings, parse_cpus

    assert parse_cpus("0-2,5") == {0, 1, 2, 5} and parse_cpus("1") == {1}
    for bad in ("", "a", "3-1", "0,,1", "-1"):
        with pytest.raises(ValueError, match="bad CPU list"):
            parse_cpus(bad)
    with pytest.raises(ValueError, match="unknown service"):
        Settings(cpus={"drafters": "0"})
    monkeypatch.setenv("SPECMESH_CPUS__STATE", "4096")  # no machine here has core 4096
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["serve", "state"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2 and "names no core" in result.output
