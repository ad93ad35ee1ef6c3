"""The state service process: committed tokens and epochs of every request."""

from __future__ import annotations

from shared.service import ServiceProcess


class StateService(ServiceProcess):
    name = "state"
    description = "SpecMesh request state: committed tokens, epochs, rollbacks"
