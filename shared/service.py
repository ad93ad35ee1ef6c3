"""The shell every SpecMesh service runs in: NATS connection, `micro` registration, shutdown.

A service is registered with nats.py's `micro`, so `$SRV.PING.<name>`, `$SRV.INFO.<name>`
and `$SRV.STATS.<name>` answer for it without code of its own. Subclasses add endpoints
in `setup` and release resources in `teardown`. The shell also sets up the process's
tracer provider (`self.tracer_provider`) and Prometheus registry (`self.registry`, served on
the service's metrics port, announced as `metrics` in the `micro` metadata), and once set up
freezes what start-up built out of garbage collection (`shared.heap`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import nats
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.service import Service

from shared.heap import GcPauses, freeze
from shared.metrics import CollectorRegistry, serve_metrics
from shared.nats_auth import credentials
from shared.settings import Settings
from shared.tracing import setup_tracing

VERSION = "0.1.0"
log = logging.getLogger("specmesh.service")


async def connect(settings: Settings, name: str, user: str | None = None) -> Client:
    """A NATS connection that keeps reconnecting for as long as the process lives.

    `name` labels the connection; `user` is the NATS user it authenticates as (a service's
    own, see `shared.nats_auth`; default: the CLI's, `SPECMESH_NATS__USER`).
    """

    async def on_error(exc: Exception) -> None:
        log.warning("nats error in %s: %s", name, exc)

    return await nats.connect(
        settings.nats.client_url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
        error_cb=on_error, connect_timeout=5, **credentials(settings, user),
    )


async def ping(nc: Client | None, name: str, timeout_s: float = 1.0) -> dict | None:
    """One instance's `micro` ping reply for service `name`; None if none answered (or no NATS)."""
    import json

    if nc is None:
        return None
    try:
        msg = await nc.request(f"$SRV.PING.{name}", b"", timeout=timeout_s)
        return json.loads(msg.data)
    except (nats.errors.Error, ValueError):  # timeout, no responders, disconnected, garbage
        return None


class ServiceProcess:
    """Base of every service process: `await Subclass(settings).run()` serves until SIGTERM."""

    name: str = "service"
    description: str = ""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.nc: Client | None = None
        self.micro: Service | None = None
        self._stop = asyncio.Event()
        self.registry = CollectorRegistry()
        self.gc_pauses = GcPauses(self.registry)
        self.tracer_provider = None
        self.metrics_url = ""

    def metadata(self) -> dict[str, str]:
        return {}

    async def prepare(self) -> None:
        """Slow start-up work (loading a model); called before the service registers, so that
        it answers no ping (and `make up` does not call it ready) until this is done."""

    async def setup(self) -> None:
        """Add endpoints and subscriptions; called once connected and registered."""

    async def teardown(self) -> None:
        """Release what `setup` took; called on shutdown."""

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        self.tracer_provider = setup_tracing(self.settings, self.name)
        metrics, port = self.settings.metrics, self.settings.metrics.port(self.name)
        if metrics.enabled and port is not None:
            port = serve_metrics(self.registry, metrics.host, port)
            self.metrics_url = f"http://{metrics.host}:{port}/metrics"
            log.info("%s metrics on %s", self.name, self.metrics_url)
        self.nc = await connect(self.settings, self.name, user=self.name)
        await self.prepare()
        metadata = self.metadata() | ({"metrics": self.metrics_url} if self.metrics_url else {})
        self.micro = await add_service(
            self.nc, name=self.name, version=VERSION, description=self.description, metadata=metadata,
        )
        ready = False
        try:
            await self.setup()
            freeze()  # what start-up built is never garbage: later collections skip it (shared.heap)
            ready = True
            log.info("%s ready (nats %s)", self.name, self.settings.nats.client_url)
            await self._stop.wait()
        finally:
            if ready:
                await self.teardown()
            else:  # what setup got to is released as far as it goes; its own error is the one raised
                with contextlib.suppress(Exception):
                    await self.teardown()
            await self.micro.stop()
            await self.nc.drain()
            self.tracer_provider.shutdown()  # flushes the spans still batched
            self.gc_pauses.close()
