"""Connection-level faults over real sockets, through both drivers.

FAULT-13 (a chaos proxy in front of one of three endpoints: refuse, blackhole, reset after N
response bytes) and FAULT-14 (the keep-alive race: a pooled connection the server closes as the
next request arrives, made deterministic with the raw server's ``close_on_reuse`` mode).
"""

from __future__ import annotations

import textwrap
import time

import httpx
import pytest

import meshlib
from e2e.conftest import service_yaml

pytestmark = pytest.mark.timeout(30)

RESETS = (httpx.ReadError, httpx.RemoteProtocolError)


def traffic_policy(spec: str, *, service: str = "reviews") -> str:
    return (
        "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\n"
        f"metadata: {{name: {service}-policy, namespace: default}}\n"
        f"spec:\n  target: {{service: {service}}}\n" + textwrap.indent(spec, "  ")
    )


# Round-robin so that, over three calls, exactly one starts on the proxied endpoint.
ROUND_ROBIN = "loadBalancer: {type: round-robin}\ncircuitBreaker: {consecutiveFailures: 1000}\n"


@pytest.fixture
def partition(echo_factory, chaos_factory):
    """Three echo backends; the first one is reached through a chaos proxy."""
    behind, a, b = echo_factory("behind"), echo_factory("a"), echo_factory("b")
    proxy = chaos_factory(behind.url, name="partition")
    return proxy, behind, a, b


def ports(proxy, a, b) -> list[int]:
    return [proxy.port, a.port, b.port]


# --- FAULT-13 ------------------------------------------------------------------------------------


def test_refused_endpoint_is_retried_elsewhere_at_once_even_for_post(
    caller, make_mesh, partition
) -> None:
    proxy, behind, a, b = partition
    proxy.set_mode("refuse")  # listener closed: ECONNREFUSED
    mesh = make_mesh(service_yaml("reviews", ports(proxy, a, b)) + traffic_policy(ROUND_ROBIN))
    c = caller.bind(mesh)
    refused = f"127.0.0.1:{proxy.port}"
    retried = 0
    for i in range(3):
        rid = f"pay-{i}"
        start = time.monotonic()
        r = c.post("http://reviews/pay", content=b"debit 10", headers={"x-request-id": rid})
        elapsed = time.monotonic() - start
        assert r.status_code == 200
        assert a.side_effects[rid] + b.side_effects[rid] == 1
        attempts = r.extensions["mesh_decision"].attempts
        if attempts[0].endpoint == refused:
            retried += 1
            assert [x.outcome for x in attempts] == ["connect_failure", "ok"]
            assert attempts[1].endpoint != refused
            assert elapsed < 0.25  # no timeout waited, at most one short backoff
    assert retried == 1
    assert behind.requests == 0


def test_blackholed_endpoint_costs_one_per_try_timeout_then_is_ejected(
    caller, make_mesh, partition
) -> None:
    proxy, behind, a, b = partition
    proxy.set_mode("blackhole")  # accepts, never answers
    policy = traffic_policy(
        "timeout: 2s\n"
        "retries: {attempts: 2, perTryTimeout: 200ms, retryOn: [timeout, connect-failure]}\n"
        "outlierDetection: {consecutiveFailures: 1, baseEjectionTime: 30s}\n" + ROUND_ROBIN
    )
    mesh = make_mesh(service_yaml("reviews", ports(proxy, a, b)) + policy)
    c = caller.bind(mesh)
    holed = f"127.0.0.1:{proxy.port}"
    latencies = []
    for _ in range(6):
        start = time.monotonic()
        r = c.get("http://reviews/item")
        latencies.append(time.monotonic() - start)
        assert r.status_code == 200 and r.json()["backend"] in ("a", "b")
        attempts = r.extensions["mesh_decision"].attempts
        if attempts[0].endpoint == holed:
            assert [x.outcome for x in attempts] == ["timeout", "ok"]
            assert 0.2 <= attempts[0].duration < 0.35  # the per-try timeout, honoured
    assert max(latencies) < 0.6  # bounded: one per-try timeout plus a short backoff
    assert sum(1 for x in latencies if x >= 0.2) == 1  # once ejected, never tried again
    state = next(
        s for s in mesh.destinations()["reviews.default"].endpoints.states if s.address == holed
    )
    assert state.is_ejected(mesh.clock()) and state.times_ejected == 1
    assert proxy.connections == 1
    assert behind.requests == 0


def test_blackholed_post_is_not_replayed(caller, make_mesh, partition) -> None:
    proxy, _, _, _ = partition
    proxy.set_mode("blackhole")
    policy = traffic_policy(
        "retries: {attempts: 2, perTryTimeout: 200ms, retryOn: [timeout, connect-failure]}\n"
    )
    mesh = make_mesh(service_yaml("reviews", [proxy.port]) + policy)
    result = caller.bind(mesh).outcome("POST", "http://reviews/pay", content=b"debit 10")
    # The request may have been delivered: a non-idempotent call is not sent again.
    assert isinstance(result, meshlib.MeshTimeout), result
    assert result.decision is not None
    assert [x.outcome for x in result.decision.attempts] == ["timeout"]


def test_reset_mid_response_is_not_retried(caller, make_mesh, partition) -> None:
    proxy, behind, a, b = partition
    # Measure one response through the proxy, then cut the next ones in the middle of the body.
    before = proxy.bytes_down
    probe = httpx.get(f"{proxy.url}/item", headers={"host": "reviews"})
    head = f"HTTP/1.1 {probe.status_code} {probe.reason_phrase}\r\n".encode()
    head += b"".join(name + b": " + value + b"\r\n" for name, value in probe.headers.raw)
    total = len(head) + 2 + len(probe.content)
    # the proxy counts forwarded bytes just after writing them: wait for the whole response
    assert proxy.wait_until(lambda p: p.bytes_down - before >= total)
    assert proxy.bytes_down - before == total
    cut = total - len(probe.content) // 2
    behind.clear_counters()
    proxy.set_mode("reset_after", n=cut)
    policy = traffic_policy("retries: {attempts: 2, retryOn: [reset, 5xx]}\n" + ROUND_ROBIN)
    mesh = make_mesh(service_yaml("reviews", ports(proxy, a, b)) + policy)
    c = caller.bind(mesh)
    results = [c.outcome("GET", f"http://reviews/item/{i}") for i in range(3)]
    errors = [x for x in results if isinstance(x, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], RESETS), results
    assert all(x.status_code == 200 for x in results if isinstance(x, httpx.Response))
    assert behind.requests == 1  # reached once, headers delivered, then cut: no second try
    assert behind.requests + a.requests + b.requests == 3
    assert proxy.resets >= 1


# --- FAULT-14 ------------------------------------------------------------------------------------


def test_keepalive_race_get_retried_on_a_fresh_connection(
    caller, make_mesh, raw_server_factory
) -> None:
    raw = raw_server_factory("ka")
    raw.set_mode("close_on_reuse")  # a reused connection is closed as the request arrives
    c = caller.bind(make_mesh(service_yaml("reviews", [raw.port])))  # unconfigured retries
    for i in range(5):
        r = c.get(f"http://reviews/item/{i}")
        assert r.status_code == 200
        outcomes = [x.outcome for x in r.extensions["mesh_decision"].attempts]
        assert outcomes == (["ok"] if i == 0 else ["reset", "ok"])
    assert raw.requests == 5
    assert raw.dropped_requests == 4
    assert raw.connections == 5


def test_keepalive_race_post_surfaces_never_duplicates(
    caller, make_mesh, raw_server_factory
) -> None:
    raw = raw_server_factory("ka")
    raw.set_mode("close_on_reuse")
    c = caller.bind(make_mesh(service_yaml("reviews", [raw.port])))
    ok = failed = 0
    for i in range(6):
        rid = f"pay-{i}"
        result = c.outcome(
            "POST", "http://reviews/pay", content=b"debit 10", headers={"x-request-id": rid}
        )
        if isinstance(result, httpx.Response):
            assert result.status_code == 200
            assert raw.side_effects[rid] == 1
            ok += 1
        else:
            assert isinstance(result, RESETS), result
            assert [x.outcome for x in result.decision.attempts] == ["reset"]  # type: ignore[attr-defined]
            assert raw.side_effects[rid] == 0  # dropped unread: the error is surfaced
            failed += 1
    assert ok >= 1 and failed >= 1
    assert max(raw.side_effects.values()) == 1
    # With an Idempotency-Key the same race is retried and succeeds.
    for i in range(3):
        key = f"key-{i}"
        r = c.post("http://reviews/pay", content=b"debit 10", headers={"Idempotency-Key": key})
        assert r.status_code == 200
        assert raw.side_effects[key] == 1
