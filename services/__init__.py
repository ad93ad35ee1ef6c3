"""SpecMesh's services: gateway, router, state and the model worker (drafter, verifier, target).

`specmesh serve NAME` runs one; `load_service(NAME)` names the class behind it.
"""

from __future__ import annotations

from importlib import import_module

from shared.settings import ROLES

_SERVICES = {
    "gateway": ("services.gateway.service", "GatewayService"),
    "router": ("services.router.service", "RouterService"),
    "state": ("services.state.service", "StateService"),
}


def load_service(name: str):
    """The service class for `name`; drafter, verifier and target are one worker in three roles."""
    if name in ROLES:
        from services.worker.service import worker_for_role

        return worker_for_role(name)
    module, cls = _SERVICES[name]
    return getattr(import_module(module), cls)
