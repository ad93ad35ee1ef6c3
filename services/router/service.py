"""The router service process: chain assignments from profiles and acceptance history."""

from __future__ import annotations

from shared.service import ServiceProcess


class RouterService(ServiceProcess):
    name = "router"
    description = "SpecMesh router: chain and k assignments"
