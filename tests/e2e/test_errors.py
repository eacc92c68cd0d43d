"""How failed calls reach the caller, over real sockets and through both drivers.

Every failure the mesh decides raises its MeshError subclass (also the matching httpx exception)
carrying ``.reason`` and ``.decision``; ``local_responses=True`` (on the mesh or on one client)
turns the same failures into sidecar-style responses with the ``x-mesh-reason`` header. A
failure the upstream caused (connect refused on every try) stays the httpx error, with
``.decision`` attached, or with ``local_responses`` becomes a 503 like Envoy's UF/UR. Every
exception that leaves a mesh call says, in a note, which service, which endpoints, how many
attempts and why. DESIGN.md §5.
"""

from __future__ import annotations

import socket
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

import meshlib
from e2e.conftest import service_yaml
from meshlib.errors import REASON_HEADER

pytestmark = pytest.mark.timeout(30)


def said(error: BaseException) -> str:
    """Everything a traceback prints for ``error`` itself: its message and its notes."""
    return "\n".join([str(error), *getattr(error, "__notes__", ())])


def assert_names_the_call(error: BaseException, decision: meshlib.Decision) -> None:
    """The exception's own text names the service, every endpoint tried, the number of
    attempts and the reason — once."""
    text = said(error)
    assert text.count("mesh call to ") == 1, text
    assert f"mesh call to {decision.service}" in text, text
    assert f"({decision.reason})" in text, text
    n = len(decision.attempts)
    assert f"after {n} attempt{'' if n == 1 else 's'}" in text, text
    for attempt in decision.attempts:
        assert attempt.endpoint in text, text
    if not decision.attempts:
        assert "no endpoint tried" in text, text


def traffic_policy(spec: str, *, service: str = "reviews") -> str:
    return (
        "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\n"
        f"metadata: {{name: {service}-policy, namespace: default}}\n"
        f"spec:\n  target: {{service: {service}}}\n" + textwrap.indent(spec, "  ")
    )


@pytest.fixture
def refused_ports() -> Iterator[Callable[[int], list[int]]]:
    """``refused_ports(n)``: ports bound but not listening (ECONNREFUSED, never reused)."""
    socks: list[socket.socket] = []

    def make(n: int) -> list[int]:
        out = []
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
            out.append(sock.getsockname()[1])
        return out

    yield make
    for sock in socks:
        sock.close()


@dataclass
class Case:
    error: type[meshlib.MeshError]
    status: int
    text: Callable[[Any], str]  # policy text, given the scenario's echo backend
    url: str = "http://reviews/item"
    warmup: int = 0  # calls made first, to bring the mesh into the failing state
    occupy: bool = False  # keep one call in flight on the backend while the failing call runs


CASES = {
    "timeout": Case(
        meshlib.MeshTimeout,
        504,
        lambda a: service_yaml("reviews", [a.port]) + traffic_policy("timeout: 300ms\n"),
    ),
    "circuit_open": Case(
        meshlib.CircuitOpenError,
        503,
        lambda a: (
            service_yaml("reviews", [a.port])
            + traffic_policy("circuitBreaker: {consecutiveFailures: 2, openDuration: 30s}\n")
        ),
        warmup=2,
    ),
    "no_healthy_endpoints": Case(
        meshlib.NoHealthyEndpointsError,
        503,
        lambda a: service_yaml("reviews", []).replace("endpoints:\n", "endpoints: []\n"),
    ),
    "retry_budget_exhausted": Case(
        meshlib.RetryBudgetExhaustedError,
        503,
        lambda a: (
            service_yaml("reviews", [a.refused])
            + traffic_policy(
                "retries: {attempts: 2, retryOn: [connect-failure],"
                " budget: {ratio: 0, minRetriesPerSecond: 0}}\n"
            )
        ),
    ),
    "rate_limited": Case(
        meshlib.RateLimitedError,
        429,
        lambda a: (
            service_yaml("reviews", [a.port])
            + traffic_policy("rateLimit: {requestsPerSecond: 0.1, burst: 1}\n")
        ),
        warmup=1,
    ),
    "overflow": Case(
        meshlib.ConnectionPoolOverflowError,
        503,
        lambda a: (
            service_yaml("reviews", [a.port])
            + traffic_policy("connectionPool: {maxConnections: 1}\n")
        ),
        occupy=True,
    ),
    "denied": Case(
        meshlib.AccessDeniedError,
        403,
        lambda a: (
            service_yaml("reviews", [a.port])
            + "---\napiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: mesh}\n"
            "spec: {egress: registry-only}\n"
        ),
        url="http://127.0.0.1:{port}/outside",
    ),
}


class Env:
    """One scenario's upstreams: an echo backend and a refused port."""

    def __init__(self, echo_factory: Any, refused_ports: Callable[[int], list[int]]) -> None:
        self.backend = echo_factory("a")
        self.port = self.backend.port
        self.refused = refused_ports(1)[0]


def run_case(
    name: str, caller: Any, make_mesh: Any, env: Env, *, mesh_local: bool, client_local: bool
) -> tuple[httpx.Response | Exception, Any]:
    case = CASES[name]
    a = env.backend
    if name == "circuit_open":
        a.set_status(503)
    if name in ("timeout", "overflow"):
        a.set_delay(2.0 if name == "timeout" else 0.5)
    mesh = make_mesh(case.text(env), local_responses=mesh_local)
    c = caller.bind(mesh, local_responses=True) if client_local else caller.bind(mesh)
    url = case.url.format(port=env.port)
    for _ in range(case.warmup):
        warm = c.outcome("GET", url)
        assert isinstance(warm, httpx.Response), warm
    if not case.occupy:
        return c.outcome("GET", url), a
    busy = threading.Thread(target=c.outcome, args=("GET", url))
    busy.start()
    try:
        assert a.wait_until(lambda b: b.in_flight == 1)
        return c.outcome("GET", url), a
    finally:
        busy.join(10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_mesh_errors_carry_reason_and_decision(
    caller, make_mesh, echo_factory, refused_ports, name
) -> None:
    case = CASES[name]
    env = Env(echo_factory, refused_ports)
    result, backend = run_case(name, caller, make_mesh, env, mesh_local=False, client_local=False)
    assert type(result) is case.error, result
    assert isinstance(result, httpx.HTTPError)  # `except httpx....` keeps working
    assert result.reason.value == name
    assert result.status == case.status
    decision = result.decision
    assert isinstance(decision, meshlib.Decision)
    assert decision.reason == name and decision.status == case.status
    if name in ("circuit_open", "rate_limited", "overflow", "no_healthy_endpoints"):
        assert decision.attempts == []  # refused locally, nothing was sent
        assert backend.requests == CASES[name].warmup + (1 if CASES[name].occupy else 0)
    if name == "retry_budget_exhausted":
        assert decision.budget == "exhausted"
        assert [a.outcome for a in decision.attempts] == ["connect_failure"]
        assert isinstance(result.__cause__, httpx.ConnectError)
    if name == "timeout":
        assert isinstance(result, httpx.TimeoutException)
    assert_names_the_call(result, decision)


@pytest.mark.parametrize("where", ["mesh", "client"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_local_responses_answer_like_a_sidecar(
    caller, make_mesh, echo_factory, refused_ports, name, where
) -> None:
    case = CASES[name]
    env = Env(echo_factory, refused_ports)
    result, _ = run_case(
        name,
        caller,
        make_mesh,
        env,
        mesh_local=where == "mesh",
        client_local=where == "client",
    )
    assert isinstance(result, httpx.Response), result
    assert result.status_code == case.status
    assert result.headers[REASON_HEADER] == name
    decision = result.extensions["mesh_decision"]
    assert decision.reason == name and decision.status == case.status


# --- failures caused upstream --------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_a_refused_connection_names_service_endpoints_attempts_and_reason(
    caller, make_mesh, refused_ports
) -> None:
    ports = refused_ports(2)
    mesh = make_mesh(service_yaml("ratings", ports))  # unconfigured: 2 retries
    result = caller.bind(mesh).outcome("GET", "http://ratings/x")
    assert type(result) is httpx.ConnectError, result  # still the httpx error, nothing else
    decision = result.decision  # type: ignore[attr-defined]
    assert len(decision.attempts) == 3
    assert_names_the_call(result, decision)
    text = said(result)
    assert "mesh call to ratings.default failed (connect_failure) after 3 attempts" in text
    assert {f"127.0.0.1:{p}" for p in ports} <= {a.endpoint for a in decision.attempts}


@pytest.mark.timeout(20)
def test_a_reset_before_the_headers_names_the_call(caller, make_mesh, raw_server_factory) -> None:
    raw = raw_server_factory("r")
    raw.set_mode("reset_before_headers")
    c = caller.bind(make_mesh(service_yaml("ratings", [raw.port])))
    result = c.outcome("GET", "http://ratings/x")
    assert isinstance(result, (httpx.ReadError, httpx.RemoteProtocolError)), result
    assert not isinstance(result, meshlib.MeshError)
    decision = result.decision  # type: ignore[union-attr]
    assert decision.reason == "reset"
    assert_names_the_call(result, decision)


@pytest.mark.timeout(20)
def test_a_reset_in_the_body_names_the_call(caller, make_mesh, raw_server_factory) -> None:
    """The error leaves from the caller's read of the body, not from the transport."""
    raw = raw_server_factory("r")
    raw.set_mode("headers_then_reset")
    c = caller.bind(make_mesh(service_yaml("ratings", [raw.port])))
    result = c.outcome("GET", "http://ratings/x")
    assert isinstance(result, (httpx.ReadError, httpx.RemoteProtocolError)), result
    decision = result.decision  # type: ignore[union-attr]
    assert_names_the_call(result, decision)
    assert "in the response body" in said(result)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("where", ["mesh", "client"])
def test_local_responses_answer_a_refused_connection_with_503(
    caller, make_mesh, refused_ports, where
) -> None:
    """Envoy answers a connect failure with a local 503 and the UF flag; so does the mesh."""
    ports = refused_ports(2)
    mesh = make_mesh(service_yaml("ratings", ports), local_responses=where == "mesh")
    c = caller.bind(mesh, local_responses=True) if where == "client" else caller.bind(mesh)
    result = c.outcome("GET", "http://ratings/x")
    assert isinstance(result, httpx.Response), result
    assert result.status_code == 503
    assert result.headers[REASON_HEADER] == "connect_failure"
    decision = result.extensions["mesh_decision"]
    assert decision.reason == "connect_failure" and decision.status == 503
    assert [a.outcome for a in decision.attempts] == ["connect_failure"] * 3


@pytest.mark.timeout(20)
def test_local_responses_answer_a_reset_with_503(caller, make_mesh, raw_server_factory) -> None:
    raw = raw_server_factory("r")
    raw.set_mode("reset_before_headers")
    c = caller.bind(make_mesh(service_yaml("ratings", [raw.port])), local_responses=True)
    result = c.outcome("GET", "http://ratings/x")
    assert isinstance(result, httpx.Response), result
    assert result.status_code == 503
    assert result.headers[REASON_HEADER] == "reset"
    assert result.extensions["mesh_decision"].reason == "reset"


@pytest.mark.timeout(20)
def test_local_responses_answer_an_injected_refusal_with_503(
    caller, make_mesh, echo_factory
) -> None:
    a = echo_factory("a")
    mesh = make_mesh(service_yaml("ratings", [a.port]))
    mesh.inject_fault("ratings", refuse=True)
    c = caller.bind(mesh, local_responses=True)
    result = c.outcome("GET", "http://ratings/x")
    assert isinstance(result, httpx.Response), result
    assert (result.status_code, result.headers[REASON_HEADER]) == (503, "connect_failure")
    assert a.requests == 0


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose listen backlog is full: the kernel drops further SYNs, so a connect
    times out (a real connect timeout, on loopback)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for sock in [*fillers, server]:
        sock.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("local", [False, True])
def test_a_connect_timeout_is_a_connect_failure(caller, make_mesh, full_backlog, local) -> None:
    """Envoy counts a connect timeout as UF, like a refusal: so does the mesh (not "reset")."""
    mesh = make_mesh(service_yaml("ratings", [full_backlog]))
    c = caller.bind(mesh, timeout=httpx.Timeout(10, connect=0.2), local_responses=local)
    result = c.outcome("GET", "http://ratings/x")
    if local:
        assert isinstance(result, httpx.Response), result
        assert (result.status_code, result.headers[REASON_HEADER]) == (503, "connect_failure")
        decision = result.extensions["mesh_decision"]
    else:
        assert type(result) is httpx.ConnectTimeout, result
        decision = result.decision  # type: ignore[attr-defined]
        assert_names_the_call(result, decision)
    assert decision.reason == "connect_failure"
    assert {a.outcome for a in decision.attempts} == {"connect_failure"}


# --- hosts outside the mesh ----------------------------------------------------------------------

TYPO = "ratngs"  # one letter short of "ratings"


def resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 80)
    except OSError:
        return False
    return True


@pytest.mark.timeout(20)
def test_a_mistyped_mesh_host_that_does_not_resolve_gets_a_hint(
    caller, make_mesh, refused_ports
) -> None:
    if resolves(TYPO):
        pytest.skip(f"{TYPO!r} resolves on this machine: the name-lookup failure cannot happen")
    mesh = make_mesh(service_yaml("ratings", refused_ports(1)))  # egress: allow-any (default)
    result = caller.bind(mesh).outcome("GET", f"http://{TYPO}/x")
    assert type(result) is httpx.ConnectError, result
    assert not hasattr(result, "decision")  # not a mesh call: passed through
    text = said(result)
    assert f"'{TYPO}' is not a mesh service; did you mean 'ratings'?" in text, text
    assert text.count("did you mean") == 1


@pytest.mark.timeout(20)
def test_egress_refusal_of_a_mistyped_mesh_host_gets_the_hint(
    caller, make_mesh, refused_ports
) -> None:
    mesh_doc = "---\napiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: mesh}\n"
    mesh_doc += "spec: {egress: registry-only}\n"
    mesh = make_mesh(service_yaml("ratings", refused_ports(1)) + mesh_doc)
    result = caller.bind(mesh).outcome("GET", f"http://{TYPO}/x")
    assert type(result) is meshlib.AccessDeniedError, result
    assert "did you mean 'ratings'?" in str(result)


def test_connect_failure_after_retries_is_the_httpx_error_with_a_decision(
    caller, make_mesh, refused_ports
) -> None:
    ports = refused_ports(4)
    mesh = make_mesh(service_yaml("reviews", ports))  # unconfigured: 2 retries
    result = caller.bind(mesh).outcome("POST", "http://reviews/pay", content=b"debit 10")
    assert isinstance(result, httpx.ConnectError), result
    assert not isinstance(result, meshlib.MeshError)
    decision = result.decision  # type: ignore[attr-defined]
    assert decision.reason == "connect_failure"
    assert [a.outcome for a in decision.attempts] == ["connect_failure"] * 3  # 2 retries max
    endpoints = [a.endpoint for a in decision.attempts]
    assert len(set(endpoints)) == 3  # each retry went to an endpoint not tried yet
    assert set(endpoints) <= {f"127.0.0.1:{p}" for p in ports}


def test_configured_attempts_are_capped_at_five_tries(caller, make_mesh, refused_ports) -> None:
    ports = refused_ports(6)
    policy = traffic_policy("retries: {attempts: 10, retryOn: [connect-failure]}\n")
    mesh = make_mesh(service_yaml("reviews", ports) + policy)
    result = caller.bind(mesh).outcome("GET", "http://reviews/item")
    assert isinstance(result, httpx.ConnectError), result
    assert len(result.decision.attempts) == 5  # type: ignore[attr-defined]


def test_unconfigured_default_retries_connect_refused_on_another_endpoint(
    caller, make_mesh, echo_factory, refused_ports
) -> None:
    a = echo_factory("a")
    (refused,) = refused_ports(1)
    # The refused endpoint weighs 50×, so the (seeded) balancer starts there.
    text = (
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews, namespace: default}\n"
        f"spec:\n  endpoints:\n  - {{address: '127.0.0.1:{refused}', weight: 50}}\n"
        f"  - {{address: '127.0.0.1:{a.port}', weight: 1}}\n"
    )
    c = caller.bind(make_mesh(text))
    r = c.post("http://reviews/pay", content=b"debit 10", headers={"x-request-id": "p1"})
    assert r.status_code == 200
    attempts = [(x.endpoint, x.outcome) for x in r.extensions["mesh_decision"].attempts]
    assert attempts == [(f"127.0.0.1:{refused}", "connect_failure"), (f"127.0.0.1:{a.port}", "ok")]
    assert a.side_effects["p1"] == 1
