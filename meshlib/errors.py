"""The one exception tree of meshlib.

Outbound failures that the mesh decides subclass the matching httpx exception, so code
written as ``except httpx.TimeoutException`` keeps working::

    Exception
    ├── ConfigError                       a policy file (or update) was rejected; .problems
    └── MeshError                         .reason (a Reason) and .decision (the call's record)
        ├── MeshTimeout                   + httpx.TimeoutException   (504, reason "timeout")
        ├── CircuitOpenError              + httpx.TransportError     (503, "circuit_open")
        ├── NoHealthyEndpointsError       + httpx.ConnectError       (503, "no_healthy_endpoints")
        ├── RetryBudgetExhaustedError     + httpx.TransportError     (503, "retry_budget_exhausted")
        ├── RateLimitedError              + httpx.TransportError     (429, "rate_limited")
        ├── ConnectionPoolOverflowError   + httpx.PoolTimeout        (503, "overflow")
        └── AccessDeniedError             + httpx.TransportError     (403, "denied")

Each class names its sidecar-style local status (``.status``) so a transport created with
``local_responses=True`` can answer like Envoy would instead of raising. A transport failure of
the upstream (connection refused, reset) keeps its own httpx type, with ``.decision`` attached.

Every exception that leaves a mesh call carries one more line, :func:`describe`'s, naming the
service, the endpoints tried, the number of attempts and the reason: an exception note (PEP
678) on Python 3.11 and later, the end of the message on 3.10 (see :func:`annotate`).
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from meshlib.decision import Decision

__all__ = [
    "REASON_HEADER",
    "AccessDeniedError",
    "CircuitOpenError",
    "ConfigError",
    "ConnectionPoolOverflowError",
    "MeshError",
    "MeshTimeout",
    "NoHealthyEndpointsError",
    "Problem",
    "RateLimitedError",
    "Reason",
    "RetryBudgetExhaustedError",
    "annotate",
    "describe",
]

#: Header carried by every local reply (and by injected aborts) naming why the mesh answered.
REASON_HEADER = "x-mesh-reason"


class Reason(str, enum.Enum):
    """Why a call ended the way it did: a short vocabulary, like Envoy's response flags.

    One value per call. ``fault_delay`` marks a call that got an injected delay and otherwise
    ended well; any failure after the delay names the failure instead (the decision's
    ``faults`` still lists the delay). ``no_route`` is a call to a service with Gateway API
    HTTPRoutes that no rule matches (404); under SMI such a call goes to the service itself. A
    host that is not a mesh service is passed through or, under ``egress: registry-only``,
    ``denied``.
    """

    OK = "ok"
    TIMEOUT = "timeout"  # UT
    CIRCUIT_OPEN = "circuit_open"  # (no Envoy flag; Hystrix-style)
    NO_HEALTHY_ENDPOINTS = "no_healthy_endpoints"  # UH
    RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"  # URX
    RATE_LIMITED = "rate_limited"  # RL
    OVERFLOW = "overflow"  # UO
    FAULT_ABORT = "fault_abort"  # FI
    FAULT_DELAY = "fault_delay"  # DI: an injected delay, the call otherwise fine
    CONNECT_FAILURE = "connect_failure"  # UF
    RESET = "reset"  # UR
    UPSTREAM_ERROR = "upstream_error"  # a 5xx answered by the upstream
    DENIED = "denied"  # RBAC
    UNAUTHENTICATED = "unauthenticated"  # (JWT origin authentication failed)
    BAD_REQUEST = "bad_request"  # DPE (inbound: a request refused as malformed)
    NO_ROUTE = "no_route"  # NR: no HTTPRoute rule matched (404)
    INVALID_BACKEND = "invalid_backend"  # NC: the rule's backend cannot be sent to (500)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a policy file: where it is and what is wrong."""

    file: str
    line: int  # 1-based; 0 when unknown
    document: int  # 1-based index of the YAML document; 0 when the file as a whole is wrong
    field: str  # dotted path inside the document, e.g. "spec.backends[1].weight"
    message: str
    column: int = 0

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        if self.column:
            where += f":{self.column}"
        doc = f" (document {self.document})" if self.document else ""
        fld = f" {self.field}:" if self.field else ""
        return f"{where}{doc}:{fld} {self.message}"


class ConfigError(ValueError):
    """A policy file or update was rejected; nothing from it was applied.

    ``problems`` lists every problem found, each naming file, line, document and field.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in policy:\n{lines}")

    @classmethod
    def from_message(cls, file: str, message: str) -> ConfigError:
        """A ConfigError for a problem with the file as a whole (unreadable, too large)."""
        return cls([Problem(file=file, line=0, document=0, field="", message=message)])


class MeshError(Exception):
    """Base of every failure the mesh decided for an outbound call."""

    reason: Reason = Reason.UPSTREAM_ERROR
    status: int = 503

    def __init__(self, message: str, *, decision: Decision | None = None, **kwargs: Any) -> None:
        # httpx exceptions take (message, *, request=...); pass the rest through the MRO.
        super().__init__(message, **kwargs)
        self.decision = decision


class MeshTimeout(MeshError, httpx.TimeoutException):
    """The call ran out of time: its overall deadline expired (every attempt and, unless the
    response is streamed, the reading of its body included), or a body read went idle."""

    reason = Reason.TIMEOUT
    status = 504


class CircuitOpenError(MeshError, httpx.TransportError):
    """The backend's circuit breaker is open; the call was not sent."""

    reason = Reason.CIRCUIT_OPEN
    status = 503


class NoHealthyEndpointsError(MeshError, httpx.ConnectError):
    """The destination has no endpoint to send to (none configured, or all unusable)."""

    reason = Reason.NO_HEALTHY_ENDPOINTS
    status = 503


class RetryBudgetExhaustedError(MeshError, httpx.TransportError):
    """A retry was warranted but the destination's retry budget was spent."""

    reason = Reason.RETRY_BUDGET_EXHAUSTED
    status = 503


class RateLimitedError(MeshError, httpx.TransportError):
    """The local rate limit for the destination refused the call."""

    reason = Reason.RATE_LIMITED
    status = 429


class ConnectionPoolOverflowError(MeshError, httpx.PoolTimeout):
    """Too many concurrent calls to the destination (connection-pool limit)."""

    reason = Reason.OVERFLOW
    status = 503


class AccessDeniedError(MeshError, httpx.TransportError):
    """Authorization refused the call."""

    reason = Reason.DENIED
    status = 403


# --- what an exception says about its call ------------------------------------------------------


def describe(decision: Decision) -> str:
    """One line on how a call ended: the service called (and the backend a split chose), the
    reason, the number of attempts and each endpoint tried with its outcome, e.g.
    ``mesh call to ratings.default failed (connect_failure) after 2 attempts: 127.0.0.1:9080
    connect_failure, 127.0.0.1:9081 connect_failure``."""
    called = decision.service
    if decision.backend is not None and decision.backend != called:
        called += f" (backend {decision.backend})"
    attempts = decision.attempts
    n = len(attempts)
    if attempts:
        tried = ", ".join(
            f"{a.endpoint} {a.outcome if a.status is None else a.status}"
            + (" (hedge)" if a.hedge else "")
            for a in attempts
        )
    else:
        tried = "no endpoint tried"
    line = f"mesh call to {called} failed ({decision.reason}) after {n} attempt"
    line += f"{'' if n == 1 else 's'}: {tried}"
    if decision.reason == Reason.TIMEOUT.value and decision.deadline is not None:
        line += f"; deadline {decision.deadline:g}s"
    if decision.budget != "ok":
        line += f"; retry budget {decision.budget}"
    if decision.faults:
        line += f"; faults {', '.join(decision.faults)}"
    return line


def annotate(error: BaseException, line: str) -> None:
    """Add ``line`` to what ``error`` says, once: as an exception note where Python has them
    (3.11+; tracebacks print notes under the message, the exception keeps its type and
    message), else at the end of its message, since 3.10's tracebacks print no notes."""
    if sys.version_info >= (3, 11):
        if line not in getattr(error, "__notes__", ()):
            error.add_note(line)
        return
    args = error.args
    if args and isinstance(args[0], str):
        if line not in args[0]:
            error.args = (f"{args[0]}\n{line}", *args[1:])
    else:
        error.args = (line, *args)
