"""The registry's failures through the whole stack (RELIABILITY.md FAULT-6..9): a real registry
(uvicorn, strict mTLS, SQLite) stopped, restarted on its data, restarted empty, or losing many
heartbeats at once; real meshes from ``Mesh.from_registry`` calling real echo backends.

Each test records what the callers saw — every endpoint set discovery handed the mesh, every
call's outcome — so "no call failed" and "the set never shrank" are asserted over the whole
window, not sampled at its ends. The windows measured are printed (``pytest -s``) for the docs.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.cli.main import main
from meshlib.config.model import Endpoint
from meshlib.control.client import PolicyRejected, RegistryClient, RegistryUnavailable
from meshlib.control.registry import RegistrySettings, instance_id
from tests.control.conftest import TD, FakeClock, RunningRegistry, StartRegistry
from tests.control.fakes import mesh_policy
from tests.control.waiting import endpoints_of, until

pytestmark = pytest.mark.timeout(30)

POLICY = mesh_policy(TD, "reviews", "productpage", mtls="disable") + (
    "---\n"
    """\
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: reviews}
spec:
  target: {service: reviews}
  retries: {attempts: 4, retryOn: [connect-failure, reset, 5xx]}
  outlierDetection: {consecutiveFailures: 1, baseEjectionTime: 30s}
"""
)

#: A short TTL so "several TTLs" is seconds (heartbeats every TTL/3).
TTL = 1.0


class Recorder:
    """Every endpoint set discovery hands ``mesh`` for ``key``, in order (it wraps the mesh's
    ``set_endpoints``, the discovery driver's sink, on the instance)."""

    def __init__(self, mesh: meshlib.Mesh, key: str = "reviews.default") -> None:
        self.sets: list[set[str]] = [endpoints_of(mesh, key)]
        self._lock = threading.Lock()
        inner = mesh.set_endpoints

        def record(
            service_key: str, endpoints: tuple[Endpoint, ...], *, authoritative: bool = True
        ) -> None:
            if service_key == key:
                with self._lock:
                    self.sets.append({e.address for e in endpoints})
            inner(service_key, endpoints, authoritative=authoritative)

        mesh.set_endpoints = record  # type: ignore[method-assign]

    def seen(self) -> list[set[str]]:
        with self._lock:
            return list(self.sets)


class Traffic:
    """Idempotent calls to reviews through one mesh's client; every outcome kept."""

    def __init__(self, mesh: meshlib.Mesh) -> None:
        self.client = mesh.client()
        self.ok = 0
        self.failures: list[str] = []
        self.backends: list[str] = []
        self._pace = threading.Event()

    def call(self) -> None:
        self._pace.wait(0.005)  # a steady trickle, not a spin on two shared cores
        try:
            response = self.client.get("http://reviews/x")
        except Exception as exc:  # a failed call is what the tests count
            self.failures.append(f"{type(exc).__name__}: {exc}")
            return
        if response.status_code != 200:
            self.failures.append(f"status {response.status_code}")
            return
        self.ok += 1
        self.backends.append(response.headers["x-backend"])

    def close(self) -> None:
        self.client.close()


def gauge(registry: CollectorRegistry, name: str, url: str) -> float | None:
    return registry.get_sample_value(name, {"registry": url})


class InstanceProcess:
    """A workload process's registry side, killable: it registers one backend through its own
    :class:`RegistryClient` and heartbeats every TTL/3 from a thread; :meth:`kill` stops the
    heartbeats and the backend at once, with no DELETE — a SIGKILL's view from outside."""

    def __init__(self, client: RegistryClient, backend: Any, ttl: float) -> None:
        self.backend = backend
        self.address = f"127.0.0.1:{backend.port}"
        self._client = client
        self._dead = threading.Event()
        client.register("default", "reviews", "127.0.0.1", backend.port, ttl=ttl)
        self._id = instance_id("default", "reviews", "127.0.0.1", backend.port)
        self._thread = threading.Thread(target=self._beat, args=(ttl / 3,), daemon=True)
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._dead.wait(interval):
            self._client.heartbeat("default", "reviews", self._id)

    def kill(self) -> None:
        self._dead.set()
        self._thread.join(5.0)
        self.backend.stop()


@pytest.fixture
def meshes(tmp_path: Path) -> Iterator[Callable[..., meshlib.Mesh]]:
    made: list[meshlib.Mesh] = []

    def make(at: RunningRegistry, service: str, **kwargs: Any) -> meshlib.Mesh:
        kwargs.setdefault("cache_dir", tmp_path / f"cache-{service}")
        kwargs.setdefault("metrics", False)
        mesh = meshlib.Mesh.from_registry(
            at.url,
            service=service,
            svid_dir=at.issue("default", service),
            watch_wait=5.0,
            **kwargs,
        )
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()


def restart(
    registry_factory: StartRegistry, old: RunningRegistry, data: Path | None = None, **kwargs: Any
) -> RunningRegistry:
    """Stop ``old`` and start a registry at its URL, on ``data`` (default: ``old``'s)."""
    port = old.server.port
    old.stop()
    return registry_factory(data or old.data, port=port, **kwargs)


# --- FAULT-6: the registry is down ---------------------------------------------------------


def test_registry_down_calls_keep_working_and_catch_up_when_it_returns(
    registry_factory: StartRegistry,
    meshes: Callable[..., meshlib.Mesh],
    echo_factory: Any,
    tmp_path: Path,
) -> None:
    registry = registry_factory()
    registry.client().apply(POLICY)
    a, b, c = echo_factory("a"), echo_factory("b"), echo_factory("c")
    reviews = meshes(registry, "reviews")
    metrics = CollectorRegistry()
    caller = meshes(registry, "productpage", metrics=True, registry=metrics)
    url = registry.url
    reviews.register("127.0.0.1", a.port, ttl=TTL)
    reviews.register("127.0.0.1", b.port, ttl=TTL)
    both = {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    assert until(lambda: endpoints_of(caller) == both)
    assert gauge(metrics, "mesh_registry_up", url) == 1.0
    assert gauge(metrics, "mesh_registry_staleness_seconds", url) == 0.0
    seen = Recorder(caller)
    traffic = Traffic(caller)
    try:
        registry.stop()
        down = time.monotonic()
        # Calls go on for three would-be TTLs of the instances: nothing expires on the
        # caller's side, the gauges say the registry is away and for how long.
        assert until(
            lambda: (
                time.monotonic() - down >= 3 * TTL
                and (gauge(metrics, "mesh_registry_staleness_seconds", url) or 0.0) >= 3 * TTL
            ),
            timeout=15.0,
            step=traffic.call,
        )
        assert gauge(metrics, "mesh_registry_up", url) == 0.0
        stale = gauge(metrics, "mesh_registry_staleness_seconds", url)
        assert stale is not None and stale >= 3 * TTL
        # A workload restarted now starts from its cache file and calls the same backends.
        second = meshlib.Mesh.from_registry(
            url,
            service="productpage",
            svid_dir=registry.issue("default", "productpage"),
            cache_dir=tmp_path / "cache-productpage",
            metrics=False,
            startup_timeout=1.0,
            watch_wait=5.0,
        )
        later = Traffic(second)
        try:
            assert endpoints_of(second) == both
            for _ in range(20):
                later.call()
            assert later.failures == [] and set(later.backends) == {"a", "b"}
            # The registry returns on its data; both clients catch up.
            back = restart(registry_factory, registry, settings=RegistrySettings(warming=2.0))
            returned = time.monotonic()
            assert until(
                lambda: gauge(metrics, "mesh_registry_up", url) == 1.0,
                timeout=20.0,
                step=traffic.call,
            )
            up_after = time.monotonic() - returned
            assert gauge(metrics, "mesh_registry_staleness_seconds", url) == 0.0
            reviews.register("127.0.0.1", c.port, ttl=TTL)
            every = both | {f"127.0.0.1:{c.port}"}
            assert until(lambda: endpoints_of(caller) == every, timeout=20.0, step=traffic.call)
            caught_up = time.monotonic() - returned
            assert until(lambda: endpoints_of(second) == every, timeout=20.0, step=later.call)
            assert back.client().status().instances == 3
        finally:
            later.close()
            second.close()
        print(
            f"\nFAULT-6: down {returned - down:.1f} s, {traffic.ok} calls, "
            f"up again {up_after:.2f} s after the return, new instance seen {caught_up:.2f} s"
        )
        assert traffic.failures == [] and later.failures == []
        assert all(s and both <= s for s in seen.seen())  # nothing dropped while away
    finally:
        traffic.close()


# --- FAULT-7: a restart with the data ------------------------------------------------------


def test_a_restart_on_its_data_loses_no_instance_and_callers_do_not_flap(
    registry_factory: StartRegistry,
    meshes: Callable[..., meshlib.Mesh],
    echo_factory: Any,
) -> None:
    registry = registry_factory()
    registry.client().apply(POLICY)
    backends = [echo_factory(name) for name in "abcd"]
    reviews = meshes(registry, "reviews")
    caller = meshes(registry, "productpage")
    for backend in backends[:3]:
        reviews.register("127.0.0.1", backend.port, ttl=2.0)
    three = {f"127.0.0.1:{b.port}" for b in backends[:3]}
    assert until(lambda: endpoints_of(caller) == three)
    before = registry.client().status()
    watched = caller.registry_status()
    assert watched is not None
    index = watched["services"]["reviews.default"]
    seen = Recorder(caller)
    traffic = Traffic(caller)
    try:
        back = restart(registry_factory, registry, settings=RegistrySettings(warming=2.0))
        status = back.client().status()
        assert status.epoch == before.epoch  # the same life: watchers keep their index
        assert status.instances == 3
        # A registration right after the restart reaches the watchers held on the old index.
        registered = time.monotonic()
        reviews.register("127.0.0.1", backends[3].port, ttl=2.0)
        four = three | {f"127.0.0.1:{backends[3].port}"}
        assert until(lambda: endpoints_of(caller) == four, step=traffic.call)
        seen_after = time.monotonic() - registered
        # Warming ends; the instances kept heartbeating, so none expires.
        assert until(
            lambda: back.client().status().state == "serving", timeout=10.0, step=traffic.call
        )
        back.expire()
        assert back.client().status().instances == 4
        for _ in range(50):
            traffic.call()
        assert endpoints_of(caller) == four
        after = caller.registry_status()
        assert after is not None and after["epoch"] == before.epoch
        assert after["services"]["reviews.default"] > index  # moved on from, not reset to 0
        sets = seen.seen()
        assert all(three <= s for s in sets), sets  # never emptier, never smaller
        assert traffic.failures == []
        print(f"\nFAULT-7: a registration after the restart seen {seen_after:.2f} s later")
    finally:
        traffic.close()


# --- FAULT-8: a restart with an empty store ------------------------------------------------


def test_an_empty_restart_warms_instances_re_register_and_callers_keep_their_sets(
    registry_factory: StartRegistry,
    meshes: Callable[..., meshlib.Mesh],
    echo_factory: Any,
    tmp_path: Path,
) -> None:
    registry = registry_factory()
    registry.client().apply(POLICY)
    backends = [echo_factory(name) for name in "abc"]
    reviews = meshes(registry, "reviews")
    caller = meshes(registry, "productpage")
    for backend in backends:
        reviews.register("127.0.0.1", backend.port, ttl=2.0)
    every = {f"127.0.0.1:{b.port}" for b in backends}
    assert until(lambda: endpoints_of(caller) == every)
    epoch = registry.client().status().epoch
    seen = Recorder(caller)
    traffic = Traffic(caller)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copytree(registry.data / "ca", fresh / "ca")  # the same CA: every SVID still works
    try:
        back = restart(registry_factory, registry, fresh, settings=RegistrySettings(warming=2.0))
        started = time.monotonic()
        status = back.client().status()
        assert status.epoch != epoch and status.state == "warming"
        assert not status.authoritative
        # Each heartbeat gets 404 and registers again at once: within one interval (TTL/3).
        assert until(lambda: back.client().status().instances == 3, step=traffic.call)
        complete = time.monotonic() - started
        assert back.client().status().state == "warming"  # all back inside the warming

        def caught_up() -> bool:
            after = caller.registry_status()
            return after is not None and after["up"] and after["epoch"] == status.epoch

        assert until(caught_up, timeout=15.0, step=traffic.call)
        resynced = time.monotonic() - started
        assert until(
            lambda: back.client().status().state == "serving", timeout=10.0, step=traffic.call
        )
        for _ in range(50):
            traffic.call()
        assert endpoints_of(caller) == every
        sets = seen.seen()
        # Never emptied, never halved from 3 (more than 50 % smaller) while warming.
        assert all(len(s) * 2 >= len(every) for s in sets), sets
        assert traffic.failures == []
        print(
            f"\nFAULT-8: all 3 instances back {complete:.2f} s after the empty restart, "
            f"the caller on the new epoch after {resynced:.2f} s"
        )
    finally:
        traffic.close()


# --- FAULT-9: self-preservation, bounded --------------------------------------------------


def test_mass_heartbeat_loss_preserves_then_expires_after_the_bound(
    registry_factory: StartRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FakeClock()
    settings = RegistrySettings(warming=0.0, default_ttl=10.0, preservation_limit=30.0)
    registry = registry_factory(clock=clock, settings=settings)
    admin = registry.client()
    ids = [admin.register("default", "reviews", "127.0.0.1", 9000 + n).id for n in range(10)]
    alive = ids[:6]  # the other 4 fall silent

    def beat() -> None:
        for id in alive:
            admin.heartbeat("default", "reviews", id)

    def cli_status() -> dict[str, str]:
        argv = ["registry", "status", "--registry", registry.url]
        assert main([*argv, "--svid-dir", str(registry.admin_svid)]) == 0
        out = capsys.readouterr().out
        return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}

    clock.advance(6.0)  # past half a TTL: 4 of 10 silent, a mass loss
    beat()
    assert registry.expire() == 0
    status = admin.status()
    assert status.state == "preserving" and "4 of 10" in (status.reason or "")
    assert cli_status()["state"].startswith("preserving")
    for _ in range(3):  # well past their TTL, nothing expires while preserving
        clock.advance(8.0)
        beat()
        assert registry.expire() == 0
    assert admin.status().instances == 10
    clock.advance(8.0)  # 30 s after it engaged: the bound; expiry resumes
    beat()
    assert registry.expire() == 4
    status = admin.status()
    assert status.state == "serving" and status.instances == 6
    assert cli_status()["state"] == "serving"
    assert {row.id for row in admin.instances()} == set(alive)
    # One dead instance of a small mesh is a death, not a partition: it expires within a TTL.
    dead, rest = alive[0], alive[1:]
    alive[:] = rest
    clock.advance(6.0)
    beat()
    assert registry.expire() == 0 and admin.status().state == "serving"
    clock.advance(4.0)  # one TTL since its last heartbeat
    beat()
    assert registry.expire() == 1
    assert dead not in {row.id for row in admin.instances()}


# --- a bad policy, a killed instance ---------------------------------------------------------


def test_a_bad_policy_is_refused_at_the_registry_and_never_reaches_a_client(
    registry: RunningRegistry, meshes: Callable[..., meshlib.Mesh], echo_factory: Any
) -> None:
    admin = registry.client()
    first = admin.apply(POLICY)
    reviews = meshes(registry, "reviews")
    caller = meshes(registry, "productpage")
    reviews.register("127.0.0.1", echo_factory("a").port)
    assert until(lambda: bool(endpoints_of(caller)))
    good = caller.snapshot
    bad = POLICY.replace("consecutiveFailures: 1", "consecutiveFailures: many")
    with pytest.raises(PolicyRejected) as refused:
        admin.apply(bad, source="bad.yaml")
    assert refused.value.status == 422
    assert any(p.startswith("bad.yaml:") for p in refused.value.problems)
    assert admin.status().policy_version == first.version
    # The next good version is the one after the first: the bad one never got a number, and
    # the clients move from the first straight to it.
    second = admin.apply(
        POLICY + "---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {name: ratings}\n"
    )
    assert second.version == first.version + 1
    assert caller.snapshot is good or "ratings.default" in caller.snapshot.services
    assert until(lambda: (caller.registry_status() or {})["policy_version"] == second.version)
    assert "ratings.default" in caller.snapshot.services
    status = caller.registry_status()
    assert status is not None and status["policy_rejected"] is None
    assert all(row.rejected_version is None for row in admin.instances())


def test_a_killed_instance_leaves_within_a_ttl_and_no_call_fails(
    registry: RunningRegistry, meshes: Callable[..., meshlib.Mesh], echo_factory: Any
) -> None:
    registry.client().apply(POLICY)
    ttl = 2.0
    client = registry.client(registry.issue("default", "reviews"))
    a = InstanceProcess(client, echo_factory("a"), ttl)
    b = InstanceProcess(
        registry.client(registry.issue("default", "reviews")), echo_factory("b"), ttl
    )
    caller = meshes(registry, "productpage")
    assert until(lambda: endpoints_of(caller) == {a.address, b.address})
    traffic = Traffic(caller)
    try:
        assert until(lambda: {"a", "b"} <= set(traffic.backends), step=traffic.call)
        b.kill()  # no drain: heartbeats stop, the port refuses
        killed = time.monotonic()
        assert until(
            lambda: endpoints_of(caller) == {a.address}, timeout=ttl + 5.0, step=traffic.call
        )
        left = time.monotonic() - killed
        calls_in_window = traffic.ok + len(traffic.failures)
        for _ in range(50):
            traffic.call()
        assert traffic.failures == []
        assert traffic.backends[-50:] == ["a"] * 50
        print(
            f"\nkill: left the caller's set {left:.2f} s after the kill (TTL {ttl} s), "
            f"{calls_in_window} calls, none failed"
        )
    finally:
        traffic.close()
        a.kill()


def test_a_stopping_registry_answers_its_held_queries(registry: RunningRegistry) -> None:
    """A blocking query held when the registry stops is answered at once with a 503 and
    ``Retry-After`` (the client backs off and comes back), not cancelled by the server's grace
    period into a 500 with a traceback, and not answered "unchanged" (which a client re-asks
    at once, spending its token bucket on a registry that is going away)."""
    # Not registry.client(): the fixture's stop() closes those first.
    client = RegistryClient(registry.url, svid_dir=str(registry.issue("default", "productpage")))
    first = client.endpoints("default", "reviews")
    outcome: list[object] = []

    def hold() -> None:
        try:
            outcome.append(client.endpoints("default", "reviews", index=first.index, wait=30.0))
        except Exception as exc:  # the answer the test expects
            outcome.append(exc)

    thread = threading.Thread(target=hold)
    thread.start()
    assert until(lambda: registry.app.watchers == 1)
    registry.stop()
    thread.join(10.0)
    client.close()
    assert len(outcome) == 1 and isinstance(outcome[0], RegistryUnavailable), outcome
    assert outcome[0].status == 503 and outcome[0].retry_after == 1.0
    assert "stopping" in str(outcome[0])


@pytest.mark.timeout(15)
def test_a_query_from_another_epoch_is_answered_at_once_even_on_the_same_index(
    registry: RunningRegistry,
) -> None:
    """FAULT-8: after an empty restart the indexes start again from 1, so a client's index for
    a quiet service is often the new registry's too; judged on the index alone its query held
    for a whole wait (the caller learned the new epoch 6 s late, and a set that differs under
    the same index was missed until then). The epoch it sends says it is from another life."""
    assert registry.client().apply(POLICY).version == 1
    client = registry.client(registry.issue("default", "productpage"))
    first = client.endpoints("default", "reviews")
    policy = client.policy()
    again = client.endpoints("default", "reviews", index=first.index, wait=60.0, epoch="other")
    assert (again.index, again.epoch) == (first.index, first.epoch)
    assert client.policy(index=1, wait=60.0, epoch="other").epoch == policy.epoch
    assert registry.app.watchers == 0
