"""Pytest fixtures that run the real stack (NATS, PostgreSQL, services) on private ports.

Loaded from tests/conftest.py. The stack lives in a temporary run dir with free ports, so
a developer's own `make up` on the default ports is never touched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def stack_env(run_dir: Path) -> dict[str, str]:
    nats, monitor, pg, http, grpc = free_ports(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECMESH_")}
    env.update({
        "SPECMESH_RUN_DIR": str(run_dir),
        "SPECMESH_NATS__PORT": str(nats), "SPECMESH_NATS__MONITOR_PORT": str(monitor),
        "SPECMESH_DATABASE__PORT": str(pg),
        "SPECMESH_GATEWAY__PORT": str(http), "SPECMESH_GATEWAY__GRPC_PORT": str(grpc),
        "SPECMESH_MODELS__PROFILE": "tiny",
        "SPECMESH_GATEWAY__DEV_MODE": "true",
        "SPECMESH_SPECULATION__ADAPTIVE_DEPTH": "true",  # off by default; the stack tests keep it exact
    })
    if "SPECMESH_MODELS__CACHE_DIR" in os.environ:
        env["SPECMESH_MODELS__CACHE_DIR"] = os.environ["SPECMESH_MODELS__CACHE_DIR"]
    return env


def specmesh(env: dict[str, str], *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "shared.cli.main", *args], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"specmesh {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def token_prompts(family, per_domain: int, seed: int, prompt_chars: int = 120, keep: int = 48) -> list[list[int]]:
    """Token-id prompts from held-out code, then prose: the last `keep` tokens of each."""
    from transformers import AutoTokenizer

    from shared.models.corpus import heldout_prompts

    tok = AutoTokenizer.from_pretrained(str(family.path("target")))
    texts = heldout_prompts("code", per_domain, prompt_chars, seed=seed) + heldout_prompts("prose", per_domain, prompt_chars, seed=seed)
    return [tok.encode(t)[-keep:] for t in texts]


def target_only(family, prompts: list[list[int]], max_tokens: int, batch: int = 8, **sampling) -> list[list[int]]:
    """Target-only decoding in this process (greedy, or with `sampling`'s SamplingParams
    fields): what every chain must reproduce."""
    from shared.engine.build import RunnerPool
    from shared.engine.sampling import SamplingParams

    chain = RunnerPool(family).chain("target")
    params = SamplingParams(**sampling)
    return [out for i in range(0, len(prompts), batch)
            for out in chain.generate(prompts[i:i + batch], max_tokens=max_tokens, sampling=params)]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """`specmesh up` on private ports; yields (env, Settings); `specmesh down` afterwards."""
    from shared.settings import Settings

    run_dir = tmp_path_factory.mktemp("stack") / ".run"
    env = stack_env(run_dir)
    try:
        specmesh(env, "up", timeout=900)
        saved = {k: os.environ.get(k) for k in env if k.startswith("SPECMESH_")}
        os.environ.update({k: v for k, v in env.items() if k.startswith("SPECMESH_")})
        try:
            yield env, Settings()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        specmesh(env, "down", "--purge", check=False)
