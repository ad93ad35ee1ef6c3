"""compose.yaml has the local stack's topology (no Docker engine runs here to start it)."""

from __future__ import annotations

from pathlib import Path

import yaml

from shared.cli.main import app
from shared.settings import ROLES, SERVICES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def test_every_service_has_an_entry():
    service_dirs = {p.name for p in (ROOT / "services").iterdir() if p.is_dir() and not p.name.startswith("_")}
    # The worker directory is one program in three roles.
    expected = (service_dirs - {"worker"}) | set(ROLES)
    assert expected <= set(COMPOSE)
    assert set(SERVICES) <= set(COMPOSE)
    assert {"nats", "postgres", "migrate", "otel-collector"} <= set(COMPOSE)


def test_each_model_service_reserves_its_own_gpu():
    ids = []
    for role in ROLES:
        devices = COMPOSE[role]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        ids += devices[0]["device_ids"]
    assert len(ids) == len(set(ids)) == len(ROLES)


def test_healthchecks_and_ordering():
    for name in (*SERVICES, "nats", "postgres"):
        assert "healthcheck" in COMPOSE[name], name
    for name in SERVICES:
        conditions = {dep: spec["condition"] for dep, spec in COMPOSE[name]["depends_on"].items()}
        assert conditions.get("nats") == "service_healthy", name
    assert "--js" in " ".join(COMPOSE["nats"]["command"]) or "-js" in COMPOSE["nats"]["command"]


def test_commands_match_the_cli():
    commands = {cmd.name or cmd.callback.__name__ for cmd in app.registered_commands}
    groups = {group.name for group in app.registered_groups}
    for name in SERVICES:
        assert COMPOSE[name]["command"] == ["serve", name]
        probe = COMPOSE[name]["healthcheck"]["test"]
        if probe[1] == "specmesh":
            assert probe[2] in commands
    assert "serve" in commands
    assert COMPOSE["migrate"]["command"][0] in groups
    assert COMPOSE["models"]["command"][0] in groups
