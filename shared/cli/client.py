"""What the CLI's HTTP clients (benchmarks) send to the gateway: the API key from `SPECMESH_API_KEY`."""

from __future__ import annotations

import os


def served_model() -> str:
    """The name the gateway serves the model under (the first of gateway.served_model_names)."""
    from shared.settings import get_settings

    return get_settings().gateway.served_model_names[0]


def api_key_header() -> dict[str, str]:
    """`Authorization: Bearer $SPECMESH_API_KEY` when set (not needed in dev mode)."""
    key = os.environ.get("SPECMESH_API_KEY", "")
    return {"Authorization": f"Bearer {key}"} if key else {}
