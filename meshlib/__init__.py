"""meshlib: an in-process service mesh for Python.

Public names only; no logic lives here. See docs/quickstart.md.
"""

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
    "serve",
    "start_metrics_server",
]
