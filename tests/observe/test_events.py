"""Call events without sockets: the reason flag of every failure kind (outbound through the
pure call sequence on a fake clock, inbound through the middleware with fake ASGI), the
event's fields, the hub's attach/detach and error isolation, and the OTel trace id."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from inbound.conftest import http_scope, tls_extension
from inbound.origin.conftest import inline_rule, jwks, request_authentication, rsa_key
from policy.fakes import Driver, FakeClock, refused, start, status, timed_out
from policy.test_call import ENDPOINTS, RETRY_5XX, SERVICE, with_policy

import meshlib
from meshlib.observe import CallEvent, Flag, attach, detach, flag_for
from meshlib.outbound.call import Outcome


class Events(list[CallEvent]):
    """A consumer that keeps every event."""

    def __call__(self, event: CallEvent) -> None:
        self.append(event)


def observed(mesh: meshlib.Mesh) -> Events:
    events = Events()
    attach(mesh, events)
    return events


def run(mesh: meshlib.Mesh, clock: FakeClock, respond: Any, method: str = "GET") -> Any:
    try:
        return Driver(clock, respond).run(start(mesh, method))
    except Exception as exc:
        return exc


# -- outbound flags --------------------------------------------------------------------------------


def test_ok_call_event_fields(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    events = observed(mesh)
    run(mesh, clock, status(200, elapsed=0.25))
    (event,) = events
    assert event.direction == "outbound" and event.flag is Flag.OK and event.reason == "ok"
    assert (event.source, event.destination) == ("productpage.default", "reviews.default")
    assert (event.method, event.authority, event.path) == ("GET", "reviews", "/r/1")
    assert (event.status, event.code, event.attempts, event.retries) == (200, "200", 1, 0)
    assert event.duration == pytest.approx(0.25)
    assert event.endpoint is not None and event.version == mesh.snapshot.version
    assert event.peer is None and event.trace_id is None


def test_retried_then_ok_counts_attempts_and_retries(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    events = observed(mesh)
    answers = iter([503, 503, 200])
    run(mesh, clock, lambda send: status(next(answers))(send))
    assert [(e.flag, e.status, e.attempts, e.retries) for e in events] == [(Flag.OK, 200, 3, 2)]


CASES: list[tuple[str, str, Callable[..., Any], Flag, str]] = [
    ("upstream 503, no retries", "retries: {attempts: 0}", status(503), Flag.UPSTREAM_ERROR, "503"),
    ("connect failure", "retries: {attempts: 0}", refused, Flag.CONNECT_FAILURE, "error"),
    (
        "deadline",
        "timeout: 1s\nretries: {attempts: 0}",
        timed_out,
        Flag.TIMEOUT,
        "504",
    ),
    (
        "reset",
        "retries: {attempts: 0}",
        lambda send: Outcome(None, httpx.RemoteProtocolError("x", request=send.request), 0.001),
        Flag.RESET,
        "error",
    ),
]


@pytest.mark.parametrize(
    ("spec", "respond", "flag", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_failure_flags(mesh_for, clock, spec: str, respond: Any, flag: Flag, code: str) -> None:
    mesh = mesh_for(with_policy(spec))
    events = observed(mesh)
    run(mesh, clock, respond)
    assert [(e.flag, e.code) for e in events] == [(flag, code)]


def test_budget_exhausted_flag_on_the_returned_503(mesh_for, clock) -> None:
    mesh = mesh_for(
        with_policy(
            "retries: {attempts: 3, retryOn: [5xx], budget: {ratio: 0.0, minRetriesPerSecond: 0}}\n"
            "circuitBreaker: {consecutiveFailures: 100}"
        )
    )
    events = observed(mesh)
    run(mesh, clock, status(503))
    assert [(e.flag, e.reason, e.status) for e in events] == [
        (Flag.BUDGET_EXHAUSTED, "upstream_error", 503)
    ]


def test_circuit_open_rate_limited_fault_and_no_endpoint_flags(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy("circuitBreaker: {consecutiveFailures: 1, openDuration: 10s}"))
    events = observed(mesh)
    run(mesh, clock, status(503))
    run(mesh, clock, status(200))
    assert [e.flag for e in events] == [Flag.UPSTREAM_ERROR, Flag.CIRCUIT_OPEN]
    assert events[1].attempts == 0 and events[1].code == "503"

    limited = mesh_for(with_policy("rateLimit: {requestsPerSecond: 1, burst: 1}"))
    events = observed(limited)
    run(limited, clock, status(200))
    run(limited, clock, status(200))
    assert [(e.flag, e.status) for e in events] == [(Flag.OK, 200), (Flag.RATE_LIMITED, 429)]

    faulty = mesh_for(with_policy("retries: {attempts: 0}"))
    events = observed(faulty)
    with faulty.inject_fault("reviews", abort=418):
        run(faulty, clock, status(200))
    assert [(e.flag, e.status, e.attempts) for e in events] == [(Flag.FAULT_INJECTED, 418, 0)]

    empty = mesh_for(SERVICE.replace(f"[{ENDPOINTS}]", "[]"))
    events = observed(empty)
    run(empty, clock, status(200))
    assert [e.flag for e in events] == [Flag.NO_HEALTHY_ENDPOINT]


def test_injected_delay_is_flagged_in_decision_event_and_metrics(clock) -> None:
    """Envoy's DI: a call that got an injected delay and was then answered says so — decision
    reason ``fault_delay``, event flag ``fault_delay`` (still a success), the metric's
    ``reason`` label — while a failure after the delay names the failure."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    mesh = meshlib.Mesh.from_text(
        with_policy("retries: {attempts: 0}"),
        service="productpage",
        clock=clock,
        seed=1,
        registry=registry,
        watch=False,
    )
    try:
        events = observed(mesh)
        with mesh.inject_fault("reviews", delay=0.2):
            delayed = run(mesh, clock, status(200))
            failed = run(mesh, clock, status(503))
        plain = run(mesh, clock, status(200))
    finally:
        mesh.close()
    decisions = [r.extensions["mesh_decision"] for r in (delayed, failed, plain)]
    assert [(d.reason, d.faults) for d in decisions] == [
        ("fault_delay", ["delay:0.2s"]),
        ("upstream_error", ["delay:0.2s"]),
        ("ok", []),
    ]
    assert [(e.flag, e.ok) for e in events] == [
        (Flag.FAULT_DELAY, True),
        (Flag.UPSTREAM_ERROR, False),
        (Flag.OK, True),
    ]
    assert "fault_delay" in events[0].text() and events[0].as_dict()["flag"] == "fault_delay"
    labels = {
        "direction": "outbound",
        "source": "productpage.default",
        "destination": "reviews.default",
        "route": "",
    }
    count = registry.get_sample_value
    assert count("mesh_requests_total", {**labels, "code": "200", "reason": "fault_delay"}) == 1
    assert count("mesh_requests_total", {**labels, "code": "503", "reason": "upstream_error"}) == 1
    assert count("mesh_requests_total", {**labels, "code": "200", "reason": "ok"}) == 1


def test_flag_for_maps_every_reason() -> None:
    for reason in meshlib.Reason:
        # Each reason has its own flag: none falls through to the catch-all for 5xx answers.
        flag = flag_for(reason.value, 200)
        assert flag is not Flag.UPSTREAM_ERROR or reason is meshlib.Reason.UPSTREAM_ERROR, reason
    assert flag_for("no_route", 404) is Flag.NO_ROUTE
    assert flag_for("invalid_backend", 500) is Flag.INVALID_BACKEND
    assert flag_for("fault_delay", 200) is Flag.FAULT_DELAY
    assert flag_for("fault_delay", 502) is Flag.UPSTREAM_ERROR
    assert flag_for("overflow", 503) is Flag.OVERFLOW
    assert flag_for("ok", 502) is Flag.UPSTREAM_ERROR
    assert flag_for("upstream_error", 503, "exhausted") is Flag.BUDGET_EXHAUSTED
    assert flag_for("something new", None) is Flag.UPSTREAM_ERROR


# -- inbound flags ---------------------------------------------------------------------------------

REVIEWS = "spiffe://shop.test/ns/default/sa/reviews"


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _failing_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 502, "headers": []})
    await send({"type": "http.response.body", "body": b"bad"})


def call(app: Any, scope: dict[str, Any]) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    asyncio.run(app(scope, receive, send))


DENY_ADMIN = """
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: productpage}
spec: {}
---
apiVersion: meshlib/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  target: {service: productpage}
  action: DENY
  rules: [{to: [{paths: ["/admin*"]}]}]
"""


def test_inbound_flags_ok_denied_rate_limited_upstream_error(make_mesh) -> None:
    from inbound.conftest import SERVICE_ONLY

    mesh = make_mesh(SERVICE_ONLY + DENY_ADMIN, service="productpage")
    events = observed(mesh)
    app = meshlib.MeshMiddleware(_ok_app, mesh=mesh, rate_limit=(0.001, 2))
    member = tls_extension(REVIEWS)
    call(app, http_scope([(b"host", b"productpage:8080")], path="/app", extensions=member))
    call(app, http_scope(path="/admin/x"))
    call(app, http_scope(path="/app"))
    call(app, http_scope(path="/app"))
    call(meshlib.MeshMiddleware(_failing_app, mesh=mesh), http_scope(path="/boom"))
    assert [(e.flag, e.status, e.path) for e in events] == [
        (Flag.OK, 200, "/app"),
        (Flag.DENIED, 403, "/admin/x"),
        (Flag.OK, 200, "/app"),
        (Flag.RATE_LIMITED, 429, "/app"),
        (Flag.UPSTREAM_ERROR, 502, "/boom"),
    ]
    first = events[0]
    assert first.direction == "inbound" and first.destination == "productpage.default"
    assert (first.source, first.peer, first.authority) == (REVIEWS, REVIEWS, "productpage:8080")
    assert events[1].source == "unauthenticated" and events[1].peer is None


def test_inbound_unauthenticated_flag(make_mesh) -> None:
    from inbound.conftest import SERVICE_ONLY

    rule = inline_rule(jwks((rsa_key(), "rsa-1")))
    mesh = make_mesh(SERVICE_ONLY + "---\n" + request_authentication(rule), service="productpage")
    events = observed(mesh)
    app = meshlib.MeshMiddleware(_ok_app, mesh=mesh)
    call(app, http_scope([(b"authorization", b"Bearer not-a-token")], path="/x"))
    assert [(e.flag, e.status) for e in events] == [(Flag.UNAUTHENTICATED, 401)]


# -- the hub ---------------------------------------------------------------------------------------


def test_no_consumer_means_no_hub_and_detach_restores_it(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    assert mesh.events is None
    events = observed(mesh)
    assert mesh.events is not None
    detach(mesh, events)
    assert mesh.events is None
    run(mesh, clock, status(200))
    assert events == []


def test_a_failing_consumer_never_fails_the_call(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))

    def broken(event: CallEvent) -> None:
        raise RuntimeError("consumer bug")

    attach(mesh, broken)
    events = observed(mesh)
    response = run(mesh, clock, status(200))
    assert response.status_code == 200 and len(events) == 1
    assert mesh.events is not None and mesh.events.failures == 1


def test_event_round_trips_through_json_and_reads_as_text(mesh_for, clock) -> None:
    mesh = mesh_for(with_policy(RETRY_5XX))
    events = observed(mesh)
    run(mesh, clock, status(503))
    event = events[0]
    again = CallEvent.from_dict(event.as_dict())
    assert again.as_dict() == event.as_dict()
    line = event.text()
    assert '"GET reviews/r/1" 503 upstream_error' in line and "attempts=4 retries=3" in line


def test_trace_id_of_the_current_span(mesh_for, clock) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    mesh = mesh_for(with_policy(RETRY_5XX))
    events = observed(mesh)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("handler") as span:
        run(mesh, clock, status(200))
    assert events[0].trace_id == format(span.get_span_context().trace_id, "032x")
