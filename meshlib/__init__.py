"""meshlib: an in-process service mesh for Python.

Public names only; no logic lives here. See docs/quickstart.md.
"""

import importlib
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
from meshlib.mesh import FaultHandle, Mesh, ReloadStatus
from meshlib.outbound.transport import AsyncMeshTransport, MeshTransport

if TYPE_CHECKING:
    from meshlib.control.app import registry_app
    from meshlib.inbound.middleware import MeshMiddleware
    from meshlib.inbound.serving import serve
    from meshlib.observe.exporter import MetricsServer, metrics_app, start_metrics_server

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


#: The public names whose modules load when first asked for (PEP 562), so that `import meshlib`
#: stays light (tests/test_public_api.py): the registry service loads asyncio, YAML and the
#: identity stack; the inbound side (middleware, authorization, serving) and the metrics
#: endpoint are not needed by a process that only calls out (start-up, issue 15).
_ON_FIRST_USE = {
    "registry_app": "meshlib.control.app",
    "MeshMiddleware": "meshlib.inbound.middleware",
    "serve": "meshlib.inbound.serving",
    "MetricsServer": "meshlib.observe.exporter",
    "metrics_app": "meshlib.observe.exporter",
    "start_metrics_server": "meshlib.observe.exporter",
}


def __getattr__(name: str) -> Any:
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module 'meshlib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups find it without calling this again
    return value


def __dir__() -> list[str]:
    # the names loaded on first use are listed before that use too (completion, help())
    return sorted({*globals(), *_ON_FIRST_USE})
