"""Real-sockets test harness (uvicorn runner, echo backend, raw HTTP server, chaos proxy)."""

from __future__ import annotations

from .chaos import ChaosProxy
from .echo import EchoBackend, RequestRecord
from .leaks import assert_threads_stopped, harness_threads, open_socket_count
from .rawserver import RawServer
from .server import ServerHandle, run_uvicorn

__all__ = [
    "ChaosProxy",
    "EchoBackend",
    "RawServer",
    "RequestRecord",
    "ServerHandle",
    "assert_threads_stopped",
    "harness_threads",
    "open_socket_count",
    "run_uvicorn",
]
