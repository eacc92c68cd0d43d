"""The call-completion event: one record per outbound call and per inbound request.

Why a separate record from :class:`~meshlib.decision.Decision`: the decision says what the
engine did for one outbound call; an event is what an operator reads afterwards — both
directions in one shape, the path and method, the duration, and the decision reduced to one
short flag (like Envoy's response flags) so "why did my request fail?" has one answer.

Cost: the hooks read ``mesh.events`` and stop when it is ``None``, which is the state until a
consumer (access log, tap, top, admin app) is attached. Consumers are called inline on the
caller's thread and must not block: each one only appends to a bounded buffer.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from meshlib.errors import Reason

if TYPE_CHECKING:
    import httpx

    from meshlib.decision import Decision

log = logging.getLogger("meshlib.observe")

Consumer = Callable[["CallEvent"], None]


class Flag(str, enum.Enum):
    """Why a call or request ended as it did, in one word (Envoy response flags in brackets)."""

    OK = "ok"
    NO_HEALTHY_ENDPOINT = "no_healthy_endpoint"  # UH
    CIRCUIT_OPEN = "circuit_open"  # (Hystrix-style; no Envoy flag)
    TIMEOUT = "timeout"  # UT
    BUDGET_EXHAUSTED = "budget_exhausted"  # URX
    RATE_LIMITED = "rate_limited"  # RL
    OVERFLOW = "overflow"  # UO
    FAULT_INJECTED = "fault_injected"  # FI: an injected abort answered
    FAULT_DELAY = "fault_delay"  # DI: an injected delay, then answered (a success)
    DENIED = "denied"  # RBAC
    UNAUTHENTICATED = "unauthenticated"  # (JWT origin authentication)
    UPSTREAM_ERROR = "upstream_error"  # a 5xx answered by the upstream
    CONNECT_FAILURE = "connect_failure"  # UF
    RESET = "reset"  # UR
    BAD_REQUEST = "bad_request"  # DPE
    NO_ROUTE = "no_route"  # NR: no HTTPRoute rule matched; the mesh answered 404
    INVALID_BACKEND = "invalid_backend"  # NC: the rule's backend cannot be sent to; 500


_BY_REASON: dict[str, Flag] = {
    Reason.OK.value: Flag.OK,
    Reason.TIMEOUT.value: Flag.TIMEOUT,
    Reason.CIRCUIT_OPEN.value: Flag.CIRCUIT_OPEN,
    Reason.NO_HEALTHY_ENDPOINTS.value: Flag.NO_HEALTHY_ENDPOINT,
    Reason.RETRY_BUDGET_EXHAUSTED.value: Flag.BUDGET_EXHAUSTED,
    Reason.RATE_LIMITED.value: Flag.RATE_LIMITED,
    Reason.OVERFLOW.value: Flag.OVERFLOW,
    Reason.FAULT_ABORT.value: Flag.FAULT_INJECTED,
    Reason.FAULT_DELAY.value: Flag.FAULT_DELAY,
    Reason.CONNECT_FAILURE.value: Flag.CONNECT_FAILURE,
    Reason.RESET.value: Flag.RESET,
    Reason.UPSTREAM_ERROR.value: Flag.UPSTREAM_ERROR,
    Reason.DENIED.value: Flag.DENIED,
    Reason.UNAUTHENTICATED.value: Flag.UNAUTHENTICATED,
    Reason.BAD_REQUEST.value: Flag.BAD_REQUEST,
    Reason.NO_ROUTE.value: Flag.NO_ROUTE,
    Reason.INVALID_BACKEND.value: Flag.INVALID_BACKEND,
}

#: Flags of calls that succeeded (a delayed call that was then answered is a success).
_SUCCESS = frozenset({Flag.OK, Flag.FAULT_DELAY})


def flag_for(reason: str, status: int | None, budget: str = "ok") -> Flag:
    """The one flag for a call: its reason, except that a failed answer returned because the
    retry budget was spent is ``budget_exhausted`` (Envoy's URX), and an unexplained 5xx is
    ``upstream_error``."""
    flag = _BY_REASON.get(reason, Flag.UPSTREAM_ERROR)
    if flag is Flag.UPSTREAM_ERROR and budget == "exhausted":
        return Flag.BUDGET_EXHAUSTED
    if flag in _SUCCESS and status is not None and status >= 500:
        return Flag.UPSTREAM_ERROR
    return flag


@dataclass(slots=True)
class CallEvent:
    """One completed outbound call or inbound request."""

    time: float  # wall clock (Unix seconds) at completion
    direction: str  # "outbound" | "inbound"
    source: str  # caller: service key outbound, peer identity (or "unauthenticated") inbound
    destination: str  # service key called (the backend a split chose) / this service inbound
    route: str | None
    method: str
    authority: str
    path: str  # logs and tap only, never a metric label
    status: int | None  # None: no HTTP status (a transport error reached the caller)
    code: str  # the metrics label: the status, or "error"
    duration: float  # seconds
    flag: Flag
    reason: str  # the meshlib.errors.Reason value behind the flag
    attempts: int = 0
    retries: int = 0
    endpoint: str | None = None  # the last attempt's endpoint (outbound)
    peer: str | None = None  # the verified SPIFFE ID of the caller (inbound), if any
    trace_id: str | None = None
    version: int | None = None  # the policy snapshot version the call ran under

    @property
    def ok(self) -> bool:
        """Whether the call succeeded (a delay injected on the way does not make it fail)."""
        return self.flag in _SUCCESS

    def as_dict(self) -> dict[str, Any]:
        return {
            "time": round(self.time, 6),
            "direction": self.direction,
            "source": self.source,
            "destination": self.destination,
            "route": self.route,
            "method": self.method,
            "authority": self.authority,
            "path": self.path,
            "status": self.status,
            "code": self.code,
            "duration_ms": round(self.duration * 1000.0, 3),
            "flag": self.flag.value,
            "reason": self.reason,
            "attempts": self.attempts,
            "retries": self.retries,
            "endpoint": self.endpoint,
            "peer": self.peer,
            "trace_id": self.trace_id,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CallEvent:
        """The inverse of :meth:`as_dict` (used by ``meshctl tap``)."""
        return cls(
            time=float(data["time"]),
            direction=str(data["direction"]),
            source=str(data["source"]),
            destination=str(data["destination"]),
            route=data.get("route"),
            method=str(data.get("method", "")),
            authority=str(data.get("authority", "")),
            path=str(data.get("path", "")),
            status=data.get("status"),
            code=str(data.get("code", "")),
            duration=float(data.get("duration_ms", 0.0)) / 1000.0,
            flag=Flag(data["flag"]),
            reason=str(data.get("reason", "")),
            attempts=int(data.get("attempts", 0)),
            retries=int(data.get("retries", 0)),
            endpoint=data.get("endpoint"),
            peer=data.get("peer"),
            trace_id=data.get("trace_id"),
            version=data.get("version"),
        )

    def text(self) -> str:
        """One readable line (the ``text`` access-log format and ``meshctl tap``)."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.time))
        millis = int((self.time % 1) * 1000)
        status = "-" if self.status is None else str(self.status)
        arrow = "->" if self.direction == "outbound" else "<-"
        other = self.destination if self.direction == "outbound" else self.source
        extra = [f"route={self.route}"] if self.route else []
        if self.direction == "outbound":
            extra.append(f"attempts={self.attempts}")
            if self.retries:
                extra.append(f"retries={self.retries}")
            if self.endpoint:
                extra.append(f"endpoint={self.endpoint}")
        if self.trace_id:
            extra.append(f"trace={self.trace_id}")
        return (
            f"{stamp}.{millis:03d}Z {self.direction:<8} {arrow} {other} "
            f'"{self.method} {self.authority}{self.path}" {status} {self.flag.value} '
            f"{self.duration * 1000.0:.1f}ms {' '.join(extra)}"
        ).rstrip()


def current_trace_id() -> str | None:
    """The current OpenTelemetry trace id, only if the application already imported the API
    (meshlib never imports it for this)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class EventHub:
    """The consumers attached to one mesh; builds each event once and hands it to all."""

    def __init__(self) -> None:
        self.consumers: tuple[Consumer, ...] = ()
        self.failures = 0  # consumer exceptions swallowed (a consumer must never fail a call)

    def outbound(
        self,
        source: str,
        destination: str,
        request: httpx.Request,
        decision: Decision,
        code: str,
        seconds: float,
    ) -> None:
        """Called once per outbound call, when it ends: from the call sequence's ``finally``, or
        when the response body still on the wire then ends (:class:`meshlib.outbound.call.Body`)."""
        url = request.url
        attempts = decision.attempts
        status = decision.status
        reason = decision.reason
        # positional: about twice as fast as keywords for a 19-field dataclass
        self.emit(
            CallEvent(
                time.time(),
                "outbound",
                source,
                destination,
                decision.route,
                request.method,
                url.netloc.decode("ascii", "replace"),
                url.path,  # no query string: it may carry secrets
                status,
                code,
                seconds,
                Flag.OK
                if reason == "ok" and (status is None or status < 500)
                else flag_for(reason, status, decision.budget),
                reason,
                len(attempts),
                decision.retries,
                attempts[-1].endpoint if attempts else None,
                None,
                current_trace_id(),
                decision.snapshot_version,
            )
        )

    def inbound(
        self,
        source: str,
        destination: str,
        scope: Mapping[str, Any],
        status: int,
        reason: Reason,
        seconds: float,
        peer: str | None = None,
        route: str | None = None,
    ) -> None:
        """Called once per inbound HTTP request where the middleware records its metrics;
        ``route`` is the framework's route template when the app exposes one."""
        self.emit(
            CallEvent(
                time.time(),
                "inbound",
                source,
                destination,
                route or None,
                str(scope.get("method", "")),
                _host_header(scope.get("headers") or ()),
                str(scope.get("path", "")),
                status,
                str(status),
                seconds,
                flag_for(reason.value, status),
                reason.value,
                0,
                0,
                None,
                peer,
                current_trace_id(),
            )
        )

    def emit(self, event: CallEvent) -> None:
        for consumer in self.consumers:
            try:
                consumer(event)
            except Exception:  # never let an observer fail or slow the call it observes
                self.failures += 1
                if self.failures == 1:
                    log.exception("call-event consumer %r failed (logged once)", consumer)

    def close(self) -> None:
        for consumer in self.consumers:
            close = getattr(consumer, "close", None)
            if close is not None:
                close()


def _host_header(headers: Iterable[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"host":
            return value.decode("latin-1")
    return ""


class Observed(Protocol):
    """What consumers attach to (:class:`meshlib.Mesh`): its hub, ``None`` while nobody listens."""

    events: EventHub | None


_attach_lock = threading.Lock()


def attach(mesh: Observed, consumer: Consumer) -> None:
    """Start handing ``mesh``'s call events to ``consumer`` (events are built from now on)."""
    with _attach_lock:
        hub = mesh.events or EventHub()
        hub.consumers = (*hub.consumers, consumer)
        mesh.events = hub


def detach(mesh: Observed, consumer: Consumer) -> None:
    """Stop handing events to ``consumer``; with no consumer left, events are not built."""
    with _attach_lock:
        hub = mesh.events
        if hub is None:
            return
        hub.consumers = tuple(c for c in hub.consumers if c is not consumer)
        if not hub.consumers:
            mesh.events = None
