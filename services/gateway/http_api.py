"""The OpenAI-compatible HTTP API: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from shared.service import ping
from shared.settings import SERVICES, Settings


def create_app(settings: Settings, service) -> FastAPI:
    app = FastAPI(title="SpecMesh", version="0.1.0",
                  description="OpenAI-compatible API over multi-level speculative decoding.")

    @app.get("/health")
    async def health() -> dict:
        """Each service as up or down, from a NATS `micro` ping."""
        others = [name for name in SERVICES if name != "gateway"]
        replies = await asyncio.gather(*(ping(service.nc, name, timeout_s=1.0) for name in others))
        services = {"gateway": "up"} | {name: ("up" if reply else "down") for name, reply in zip(others, replies)}
        return {"status": "ok" if all(v == "up" for v in services.values()) else "degraded", "services": services}

    return app
