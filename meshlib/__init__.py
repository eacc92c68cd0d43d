"""meshlib: an in-process service mesh for Python."""

from meshlib.errors import (
    AccessDeniedError,
    CircuitOpenError,
    ConfigError,
    ConnectionPoolOverflowError,
    MeshError,
    MeshTimeout,
    NoHealthyEndpointsError,
    RateLimitedError,
    RetryBudgetExhaustedError,
)

__all__ = [
    "AccessDeniedError",
    "CircuitOpenError",
    "ConfigError",
    "ConnectionPoolOverflowError",
    "MeshError",
    "MeshTimeout",
    "NoHealthyEndpointsError",
    "RateLimitedError",
    "RetryBudgetExhaustedError",
]
