"""The gateway process: serves the HTTP API (uvicorn) beside its NATS connection."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from services.gateway.http_api import create_app
from shared.service import ServiceProcess

log = logging.getLogger("specmesh.gateway")


def http_config(app, cfg, port: int | None = None) -> uvicorn.Config:
    """uvicorn's configuration of the HTTP API: TLS when the gateway has a certificate."""
    tls = {"ssl_certfile": str(cfg.ssl_certfile), "ssl_keyfile": str(cfg.ssl_keyfile)} if cfg.tls else {}
    return uvicorn.Config(app, host=cfg.host, port=cfg.port if port is None else port, log_level="warning",
                          lifespan="on", **tls)


class GatewayService(ServiceProcess):
    name = "gateway"
    description = "SpecMesh gateway: OpenAI-compatible HTTP API and gRPC"

    async def setup(self) -> None:
        from services.gateway.backend import NatsBackend
        from services.gateway.grpc_server import start_grpc

        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        from shared.metrics import GatewayMetrics

        cfg = self.settings.gateway
        self.backend = NatsBackend(self.settings, self.nc, self.tracer_provider, GatewayMetrics(self.registry))
        self.backend.tokenizer()  # load once, before the first request
        self.backend.generation_defaults  # read (and checked) at start, like the chat template
        self.responses = await self._response_store() if cfg.responses_store else None
        await self.backend.follow_router()
        self.grpc = await start_grpc(self.settings, self.backend, self.tracer_provider)
        app = create_app(self.settings, self)  # `/metrics` serves self.registry
        self.background = app.state.background
        self.backend.metrics.background_responses.set_function(lambda: len(self.background.tasks))
        FastAPIInstrumentor.instrument_app(app, tracer_provider=self.tracer_provider, excluded_urls="health,metrics",
                                           exclude_spans=["receive", "send"])
        self.http = uvicorn.Server(http_config(app, cfg))
        self.http.install_signal_handlers = lambda: None  # the service shell owns signals
        self._http_task = asyncio.create_task(self.http.serve())

    async def _response_store(self):
        """The JetStream bucket of stored responses; None (answers say store: false) if it cannot be had."""
        from nats.js.errors import BadRequestError

        from services.gateway.response_store import BUCKET, KvResponseStore

        cfg, js = self.settings.gateway, self.nc.jetstream()
        try:
            return await KvResponseStore.open(js, cfg.responses_ttl_s, cfg.responses_max_bytes)
        except BadRequestError as exc:  # the bucket exists with other limits: keep it as it is
            log.warning("response store: bucket %s kept with its own limits (%s)", BUCKET, exc)
            return KvResponseStore(await js.key_value(BUCKET))
        except Exception as exc:
            log.warning("no response store, responses are answered with store: false: %s: %s",
                        type(exc).__name__, exc)
            return None

    async def teardown(self) -> None:
        self.http.should_exit = True
        await self._http_task
        await self.background.close()  # what still runs in the background is recorded cancelled
        await self.grpc.stop(grace=2)
