"""Each endpoint a mesh transport calls gets its own connection pool (issue 15, item 2), over
real sockets, sync and async: ``limits=`` bound each endpoint, not the client; the pools are
bounded (past the cap the least recently used quiet one is closed, never one still in use);
closing the transport closes every pool's connections."""

from __future__ import annotations

import textwrap
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

import meshlib
from e2e.conftest import Caller, service_yaml
from meshlib.outbound import pools as pools_module

pytestmark = pytest.mark.timeout(30)

ROUND_ROBIN = textwrap.dedent("""\
    ---
    apiVersion: meshlib/v1
    kind: TrafficPolicy
    metadata: {name: reviews-policy, namespace: default}
    spec:
      target: {service: reviews}
      loadBalancer: {type: round-robin}
    """)


def transport_of(c: Caller) -> Any:
    return c._client._transport


def pools_of(c: Caller) -> dict[int, Any]:
    """Port → transport of each plain endpoint pool of ``c``'s mesh transport."""
    items = transport_of(c)._pools.items()
    assert all(not tls for (tls, _), _ in items)
    return {int(address.rsplit(":", 1)[1]): transport for (_, address), transport in items}


def port_of(response: httpx.Response) -> int:
    """The endpoint port the call's (only) attempt went to, from its decision record."""
    attempts = response.extensions["mesh_decision"].attempts
    assert len(attempts) == 1
    return int(attempts[0].endpoint.rsplit(":", 1)[1])


def connections(transport: Any) -> list[Any]:
    return list(transport._pool.connections)


def test_limits_bound_each_endpoint_not_the_client(caller, make_mesh, echo_factory) -> None:
    """max_connections=1 and three endpoints: three calls in flight at once, one per endpoint
    (one shared pool would serialise them all), and never two at one endpoint."""
    backends = [echo_factory(name) for name in "abc"]
    for backend in backends:
        backend.set_delay(1.0)
    ports = [b.port for b in backends]
    mesh = make_mesh(service_yaml("reviews", ports) + ROUND_ROBIN)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    c = caller.bind(mesh, limits=limits, timeout=10.0)
    with ThreadPoolExecutor(1) as runner:
        results = runner.submit(c.many, 6, "GET", "http://reviews/", concurrency=6)
        for backend in backends:
            assert backend.wait_until(lambda b: b.in_flight == 1)
        # All three were seen in flight; the delay keeps the first round there together.
        assert [b.in_flight for b in backends] == [1, 1, 1]
        answers = results.result(timeout=20)
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in answers)
    assert [b.requests for b in backends] == [2, 2, 2]
    assert [b.max_in_flight for b in backends] == [1, 1, 1]  # the limit held per endpoint
    pools = pools_of(c)
    assert sorted(pools) == sorted(ports)
    assert [len(connections(pools[p])) for p in ports] == [1, 1, 1]  # each its own connection


def test_pools_past_the_cap_are_closed_least_recently_used_first(
    caller, make_mesh, echo_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pools_module, "MAX_POOLS", 2)
    backends = [echo_factory(name) for name in "abc"]
    ports = [b.port for b in backends]
    mesh = make_mesh(service_yaml("reviews", ports) + ROUND_ROBIN)
    c = caller.bind(mesh)
    seen: dict[int, Any] = {}
    called: list[int] = []
    for i in range(9):  # round-robin: each endpoint in turn
        response = c.get("http://reviews/")
        assert response.status_code == 200
        called.append(port_of(response))
        pools = pools_of(c)
        assert len(pools) == min(i + 1, 2)  # never past the cap
        for port, transport in pools.items():
            seen.setdefault(port, connections(transport)[0])
        if i >= 2:
            # The pool of the endpoint called two calls ago was closed with its connection.
            assert sorted(pools) == sorted(called[-2:])
            assert seen.pop(called[-3]).is_closed()
    assert [b.requests for b in backends] == [3, 3, 3]


def test_close_closes_every_endpoint_pool(caller, make_mesh, echo_factory) -> None:
    backends = [echo_factory(name) for name in "abc"]
    mesh = make_mesh(service_yaml("reviews", [b.port for b in backends]) + ROUND_ROBIN)
    c = caller.bind(mesh)
    for _ in range(3):
        assert c.get("http://reviews/").status_code == 200
    opened = [connections(t)[0] for t in pools_of(c).values()]
    assert len(opened) == 3 and not any(conn.is_closed() for conn in opened)
    if c.mode == "sync":
        transport_of(c).close()
    else:
        c._run(transport_of(c).aclose())
    assert all(conn.is_closed() for conn in opened)
    assert pools_of(c) == {}


@pytest.mark.timeout(20)
def test_a_pool_with_a_response_still_being_read_is_not_closed(
    make_mesh, echo_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cap 1 while a streamed response from endpoint a is open: calls to b and c evict each
    other, never a's pool, and a's body is read whole afterwards."""
    monkeypatch.setattr(pools_module, "MAX_POOLS", 1)
    backends = [echo_factory(name) for name in "abc"]
    ports = [b.port for b in backends]
    mesh: meshlib.Mesh = make_mesh(service_yaml("reviews", ports) + ROUND_ROBIN)
    with mesh.client() as client:
        with client.stream("GET", "http://reviews/held") as held:
            assert held.status_code == 200
            kept = port_of(held)
            transport: Any = client._transport
            pool = dict(transport._pools.items())[(False, f"127.0.0.1:{kept}")]
            for _ in range(4):  # round-robin: the two others, the held one (a second
                # connection in its pool), one other
                assert client.get("http://reviews/").status_code == 200
                assert dict(transport._pools.items())[(False, f"127.0.0.1:{kept}")] is pool
            body = held.read()
        assert held.json()["path"] == "/held" and body
        assert sorted(b.requests for b in backends) == [1, 2, 2]


def test_a_users_own_inner_transport_carries_every_plain_attempt(make_mesh, echo_factory) -> None:
    """``inner=`` is the user's choice: every endpoint's attempts go through it, no pool of
    the mesh's own is built."""

    class Counting(httpx.HTTPTransport):
        sent = 0

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            Counting.sent += 1
            return super().handle_request(request)

    backends = [echo_factory(name) for name in "ab"]
    mesh: meshlib.Mesh = make_mesh(
        service_yaml("reviews", [b.port for b in backends]) + ROUND_ROBIN
    )
    transport = meshlib.MeshTransport(mesh, inner=Counting())
    with httpx.Client(transport=transport) as client:
        for _ in range(4):
            assert client.get("http://reviews/").status_code == 200
        assert Counting.sent == 4
        assert transport._pools.items() == []
    assert [b.requests for b in backends] == [2, 2]


def test_a_lease_ends_even_when_closing_an_evicted_pool_fails(
    make_mesh, echo_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cap 1: the second endpoint's call evicts the first one's pool, whose close raises; the
    call fails with that error, but the new pool's lease still ends (a pool leased for good
    would never be evicted again)."""
    monkeypatch.setattr(pools_module, "MAX_POOLS", 1)
    backends = [echo_factory(name) for name in "ab"]
    mesh: meshlib.Mesh = make_mesh(
        service_yaml("reviews", [b.port for b in backends]) + ROUND_ROBIN
    )

    def broken_close() -> None:
        raise OSError("close failed")

    with mesh.client() as client:
        transport: Any = client._transport
        assert client.get("http://reviews/").status_code == 200
        ((_, first),) = transport._pools.items()
        monkeypatch.setattr(first, "close", broken_close)
        with pytest.raises(OSError, match="close failed"):
            client.get("http://reviews/")
        ((key, _),) = transport._pools.items()
        pool = transport._pools.lease(key)[0]
        transport._pools.release(pool)
        assert pool.leases == []  # only the lease just taken and released: none left over
        monkeypatch.undo()  # the evicted transport is closed for real when the test ends
        first.close()
