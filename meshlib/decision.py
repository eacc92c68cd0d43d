"""The decision record: what the mesh concluded and did for one call.

Every call has one. It is reachable from the response (``response.extensions["mesh_decision"]``)
and from every :class:`~meshlib.errors.MeshError` (``.decision``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Key of the decision record in ``httpx.Response.extensions``.
DECISION_EXTENSION = "mesh_decision"


@dataclass(slots=True)
class AttemptRecord:
    """One try of the call on one endpoint."""

    number: int  # 1-based
    endpoint: str  # host:port
    outcome: str  # "ok", "status", "connect_failure", "reset", "timeout", "error", "cancelled"
    status: int | None = None
    error: str | None = None
    duration: float = 0.0
    hedge: bool = False  # started as a hedge (backup request)
    backoff: float = 0.0  # seconds waited after this attempt before the retry (0: none)


@dataclass(slots=True)
class Decision:
    """What the engine decided for one call."""

    service: str  # destination service key as called ("reviews.default")
    snapshot_version: int
    route: str | None = None
    split: str | None = None
    backend: str | None = None  # service key the split chose (or the service itself)
    attempts: list[AttemptRecord] = field(default_factory=list)
    retries: int = 0
    hedges: int = 0
    budget: str = "ok"  # "ok" | "exhausted"
    faults: list[str] = field(default_factory=list)  # e.g. ["delay:200ms", "abort:503"]
    mirrored_to: str | None = None
    reason: str = "ok"  # a meshlib.errors.Reason value
    status: int | None = None  # the status returned to the caller (local or upstream)
    deadline: float | None = None  # overall timeout in seconds, if any
    mtls: bool = False  # attempts went over mutual TLS (the backend's effective mtls mode)

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "snapshot_version": self.snapshot_version,
            "route": self.route,
            "split": self.split,
            "backend": self.backend,
            "attempts": [
                {
                    "number": a.number,
                    "endpoint": a.endpoint,
                    "outcome": a.outcome,
                    "status": a.status,
                    "error": a.error,
                    "duration": round(a.duration, 6),
                    "hedge": a.hedge,
                    "backoff": round(a.backoff, 6),
                }
                for a in self.attempts
            ],
            "retries": self.retries,
            "hedges": self.hedges,
            "budget": self.budget,
            "faults": list(self.faults),
            "mirrored_to": self.mirrored_to,
            "reason": self.reason,
            "status": self.status,
            "deadline": self.deadline,
            "mtls": self.mtls,
        }
