"""Endpoints discovered from the registry (``Mesh.set_endpoints``) over real sockets: a service
declared without endpoints is called through the discovered ones, a new set moves traffic, an
endpoint that stays keeps its health (an ejected one stays ejected), static and discovered
endpoints merge (static wins on an address), the snapshot is untouched, and a service the
policy does not declare stays uncallable until a snapshot declares it."""

from __future__ import annotations

import random
import threading

import pytest
from control.fakes import MemorySource
from policy.fakes import FakeClock

from e2e.conftest import service_yaml
from meshlib.config.loader import load_text
from meshlib.config.model import Endpoint
from meshlib.control.discovery import Discovery, Pacing
from meshlib.control.registry import Registry, RegistrySettings

pytestmark = pytest.mark.timeout(30)

URL = "http://reviews/r"
EMPTY_REVIEWS = (
    "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\nspec: {endpoints: []}\n"
)
ROUND_ROBIN = """\
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: reviews-policy}
spec:
  target: {service: reviews}
  retries: {attempts: 0}
  circuitBreaker: {consecutiveFailures: 1000000}
  loadBalancer: {type: round-robin}
  outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}
"""


FAST = Pacing(interval=0.01, first_jitter=0.0, backoff_base=0.01, backoff_cap=0.02)


def at(*backends: object) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"127.0.0.1:{b.port}") for b in backends)  # type: ignore[attr-defined]


def served(c, n: int) -> list[str]:
    return [c.get(URL).json()["backend"] for _ in range(n)]


def test_a_service_without_static_endpoints_is_called_through_discovered_ones(
    caller, make_mesh, echo_factory
) -> None:
    a, b, c2 = echo_factory("a"), echo_factory("b"), echo_factory("c")
    mesh = make_mesh(EMPTY_REVIEWS + "---\n" + ROUND_ROBIN)
    version = mesh.snapshot.version
    router = mesh.router
    mesh.set_endpoints("reviews.default", at(a, b))
    c = caller.bind(mesh)
    assert sorted(served(c, 4)) == ["a", "a", "b", "b"]
    # Replacing the set moves the traffic; no new snapshot, no new router.
    mesh.set_endpoints("reviews.default", at(c2))
    assert served(c, 3) == ["c", "c", "c"]
    assert mesh.snapshot.version == version
    assert mesh.router is router
    assert mesh.discovered()["reviews.default"].endpoints == at(c2)


def test_an_ejected_endpoint_that_stays_in_the_set_stays_ejected(
    caller, make_mesh, echo_factory
) -> None:
    a, b, c2 = echo_factory("a"), echo_factory("b"), echo_factory("c")
    clock = FakeClock()
    mesh = make_mesh(EMPTY_REVIEWS + "---\n" + ROUND_ROBIN, clock=clock)
    mesh.set_endpoints("reviews.default", at(a, b))
    c = caller.bind(mesh)
    a.set_status(503)
    for _ in range(6):
        c.outcome("GET", URL)
    dest = mesh.destinations()["reviews.default"]
    (state,) = [s for s in dest.endpoints.states if s.address == f"127.0.0.1:{a.port}"]
    assert state.is_ejected(clock())
    before = a.requests
    mesh.set_endpoints("reviews.default", at(a, b, c2))
    (kept,) = [s for s in dest.endpoints.states if s.address == f"127.0.0.1:{a.port}"]
    assert kept is state and kept.is_ejected(clock())  # health kept across the update
    assert set(served(c, 6)) == {"b", "c"}
    assert a.requests == before


def test_static_and_discovered_endpoints_merge_static_wins(caller, make_mesh, echo_factory) -> None:
    a, b = echo_factory("a"), echo_factory("b")
    mesh = make_mesh(service_yaml("reviews", [a.port]) + "---\n" + ROUND_ROBIN)
    c = caller.bind(mesh)
    assert served(c, 2) == ["a", "a"]  # the destination exists before the update
    mesh.set_endpoints(
        "reviews.default",
        (Endpoint(f"127.0.0.1:{a.port}", 5, {"from": "registry"}), *at(b)),
    )
    assert sorted(served(c, 4)) == ["a", "a", "b", "b"]
    states = mesh.destinations()["reviews.default"].endpoints.states
    assert [(s.address, s.endpoint.weight, dict(s.endpoint.labels)) for s in states] == [
        (f"127.0.0.1:{a.port}", 1, {}),  # the policy's endpoint, not the registry's view
        (f"127.0.0.1:{b.port}", 1, {}),
    ]
    mesh.set_endpoints("reviews.default", ())  # the static floor remains
    assert served(c, 2) == ["a", "a"]


def test_an_undeclared_service_is_stored_until_a_snapshot_declares_it(
    caller, make_mesh, echo_factory
) -> None:
    a, r = echo_factory("a"), echo_factory("r")
    mesh = make_mesh(service_yaml("ratings", [r.port]))
    mesh.set_endpoints("reviews.default", at(a))
    c = caller.bind(mesh)
    assert mesh.router.resolve("reviews", "default") is None  # still not a mesh service
    assert "reviews.default" not in mesh.destinations()
    mesh.apply(load_text(service_yaml("ratings", [r.port]) + "---\n" + EMPTY_REVIEWS))
    assert served(c, 2) == ["a", "a"]


def test_a_new_snapshot_keeps_the_discovered_endpoints(caller, make_mesh, echo_factory) -> None:
    a, b = echo_factory("a"), echo_factory("b")
    mesh = make_mesh(EMPTY_REVIEWS)
    mesh.set_endpoints("reviews.default", at(a))
    c = caller.bind(mesh)
    assert served(c, 1) == ["a"]
    mesh.apply(load_text(service_yaml("reviews", [b.port]) + "---\n" + ROUND_ROBIN))
    assert sorted(served(c, 4)) == ["a", "a", "b", "b"]


def test_set_endpoints_refuses_a_bad_key_or_address(make_mesh) -> None:
    mesh = make_mesh(EMPTY_REVIEWS)
    with pytest.raises(ValueError, match=r"'reviews' is not 'name\.namespace'"):
        mesh.set_endpoints("reviews", ())
    with pytest.raises(ValueError, match="address 'nohost' is not 'host:port'"):
        mesh.set_endpoints("reviews.default", (Endpoint("nohost"),))
    assert mesh.discovered() == {}  # nothing half-applied


def test_concurrent_updates_and_calls_keep_a_consistent_view(
    caller, make_mesh, echo_factory
) -> None:
    backends = [echo_factory(f"b{i}") for i in range(4)]
    mesh = make_mesh(EMPTY_REVIEWS + "---\n" + ROUND_ROBIN)
    sets = [at(backends[0], backends[1]), at(backends[2], backends[3])]
    mesh.set_endpoints("reviews.default", sets[0])
    c = caller.bind(mesh)
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set() and i < 10_000:
            i += 1
            mesh.set_endpoints("reviews.default", sets[i % 2])

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        codes = [c.get(URL).status_code for _ in range(40)]
    finally:
        stop.set()
        worker.join(5)
    assert codes == [200] * 40
    states = mesh.destinations()["reviews.default"].endpoints.states
    assert tuple(s.endpoint for s in states) in sets


def test_discovery_feeds_the_mesh_and_calls_follow_the_registry(
    caller, make_mesh, echo_factory
) -> None:
    """The whole client chain without the registry's server: the registry's core (in memory)
    → Discovery's watch and guard → Mesh.set_endpoints → calls to real backends."""
    a, b = echo_factory("a"), echo_factory("b")
    clock = FakeClock()
    source = MemorySource(Registry("epoch-1", clock(), RegistrySettings(warming=0.0)), clock)
    mesh = make_mesh(EMPTY_REVIEWS + "---\n" + ROUND_ROBIN)
    source.register(a.port)
    updates = threading.Condition()
    sizes: list[int] = []

    class Forward:  # the mesh is the sink; the test is told when an update reached it
        def set_endpoints(
            self, key: str, endpoints: tuple[Endpoint, ...], *, authoritative: bool
        ) -> None:
            mesh.set_endpoints(key, endpoints, authoritative=authoritative)
            with updates:
                sizes.append(len(endpoints))
                updates.notify_all()

    discovery = Discovery(
        source, Forward(), services=("reviews.default",), pacing=FAST, rng=random.Random(1)
    ).start()
    try:
        c = caller.bind(mesh)
        with updates:
            assert updates.wait_for(lambda: sizes == [1], 5.0)
        assert served(c, 2) == ["a", "a"]
        source.register(b.port)
        with updates:
            assert updates.wait_for(lambda: sizes == [1, 2], 5.0)
        assert sorted(served(c, 4)) == ["a", "a", "b", "b"]
    finally:
        discovery.stop()
    assert not discovery.running


def test_apply_of_a_snapshot_numbered_below_the_one_in_force_still_takes_effect(
    caller, make_mesh, echo_factory
) -> None:
    """``load_text`` numbers a snapshot 0 by default; destinations adopt snapshots by version, so
    Mesh.apply renumbers one that is not above the version in force (it used to be ignored by
    every destination that existed already: calls kept going to the old endpoints)."""
    a, b = echo_factory("a"), echo_factory("b")
    mesh = make_mesh(service_yaml("reviews", [a.port]))
    c = caller.bind(mesh)
    assert served(c, 2) == ["a", "a"]
    mesh.apply(load_text(service_yaml("reviews", [b.port])))  # version 0
    assert mesh.snapshot.version > 0
    assert served(c, 2) == ["b", "b"]
