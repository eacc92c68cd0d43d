"""meshlib: an in-process service mesh for Python.

Public names only; no logic lives here. See docs/quickstart.md.
"""

from typing import TYPE_CHECKING, Any

from meshlib.decision import DECISION_EXTENSION, AttemptRecord, Decision
from meshlib.errors import (
    REASON_HEADER,
    AccessDeniedError,
    CircuitOpenError,
    ConfigError,
    ConnectionPoolOverflowError,
    MeshError,
    MeshTimeout,
    NoHealthyEndpointsError,
    Problem,
    RateLimitedError,
    Reason,
    RetryBudgetExhaustedError,
)
from meshlib.inbound import MeshMiddleware
from meshlib.inbound.serving import serve
from meshlib.mesh import FaultHandle, Mesh, ReloadStatus
from meshlib.observe.exporter import MetricsServer, metrics_app, start_metrics_server
from meshlib.outbound.transport import AsyncMeshTransport, MeshTransport

if TYPE_CHECKING:
    from meshlib.control.app import registry_app

__version__ = "0.1.0"

__all__ = [
    "DECISION_EXTENSION",
    "REASON_HEADER",
    "AccessDeniedError",
    "AsyncMeshTransport",
    "AttemptRecord",
    "CircuitOpenError",
    "ConfigError",
    "ConnectionPoolOverflowError",
    "Decision",
    "FaultHandle",
    "Mesh",
    "MeshError",
    "MeshMiddleware",
    "MeshTimeout",
    "MeshTransport",
    "MetricsServer",
    "NoHealthyEndpointsError",
    "Problem",
    "RateLimitedError",
    "Reason",
    "ReloadStatus",
    "RetryBudgetExhaustedError",
    "__version__",
    "metrics_app",
    "registry_app",
    "serve",
    "start_metrics_server",
]


def __getattr__(name: str) -> Any:
    # The registry service loads asyncio, YAML and the identity stack: only when asked for
    # (PEP 562), so `import meshlib` stays light (tests/test_public_api.py).
    if name == "registry_app":
        from meshlib.control.app import registry_app

        return registry_app
    raise AttributeError(f"module 'meshlib' has no attribute {name!r}")
