"""The model worker process: hosts one model of the chain in a role (drafter, verifier, target).

Replicas of a role share a NATS queue group, so adding a process adds capacity.
"""

from __future__ import annotations

import logging

from shared.service import ServiceProcess
from shared.settings import Settings

log = logging.getLogger("specmesh.worker")

MODEL_FOR_ROLE = {"drafter": "drafter", "verifier": "verifier", "target": "target"}


class WorkerService(ServiceProcess):
    role: str = "target"
    description = "SpecMesh model worker"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        from shared.models.family import resolve_family

        self.family = resolve_family(settings)
        self.model_path = self.family.path(MODEL_FOR_ROLE[self.role])

    def metadata(self) -> dict[str, str]:
        engine = self.settings.engine
        return {"role": self.role, "model": str(self.model_path), "device": engine.device,
                "dtype": engine.dtype, "threads": str(engine.threads)}


def worker_for_role(role: str) -> type[WorkerService]:
    """A WorkerService subclass registered on NATS under the role's name."""
    return type(f"{role.title()}Worker", (WorkerService,), {"name": role, "role": role})
