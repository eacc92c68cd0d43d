"""The registry end to end across processes (issue 11): ``meshctl registry serve`` and each
workload (examples/registry_workload.py: ``Mesh.from_env()`` + ``meshlib.serve``) are separate
processes on 127.0.0.1, each in its own process group, stopped by the fixtures' finalizers.

The test process is a caller (service ``loadgen``, its own mesh from the registry) driving GETs
into productpage, which calls ``reviews``: a TrafficSplit over reviews-v1 and reviews-v2.
Measured figures (apply → first call on the new backend, kill → gone from the callers'
endpoints) are printed (``pytest -s``); docs/control-plane.md quotes them.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness.processes import Child, Processes, Traffic, until

import meshlib
from meshlib.control.client import RegistryClient

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = ROOT / "examples" / "registry_workload.py"
TD = "bookinfo.test"
#: The registry's default instance TTL, and its expiry pass's period.
TTL, TICK = 10.0, 1.0


def policy(v1: int, v2: int) -> str:
    services = "".join(
        f"---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {{name: {name}}}\n"
        f"spec: {{serviceAccount: {account}}}\n"
        for name, account in (
            ("loadgen", "loadgen"),
            ("productpage", "productpage"),
            ("reviews", "reviews"),
            ("reviews-v1", "reviews"),
            ("reviews-v2", "reviews"),
        )
    )
    return (
        "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: bookinfo}\n"
        f"spec: {{trustDomain: {TD}, mtls: strict}}\n{services}"
        "---\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\n"
        "metadata: {name: reviews-canary}\nspec:\n  service: reviews\n  backends:\n"
        f"  - {{service: reviews-v1, weight: {v1}}}\n  - {{service: reviews-v2, weight: {v2}}}\n"
    )


def meshctl(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", *args],
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    return done.stdout.decode()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """``spawn(name, argv, env)``: a child process; every one is stopped at teardown (SIGTERM
    to its group, SIGKILL after 10 s) and must be gone."""
    processes = Processes(tmp_path)
    yield processes.start
    processes.stop()


@dataclass
class Cluster:
    data: Path
    url: str
    admin: dict[str, str]
    spawn: Callable[..., Child]
    addresses: dict[str, str] = field(default_factory=dict)
    children: dict[str, Child] = field(default_factory=dict)

    def svid(self, account: str) -> Path:
        out = self.data / "svids" / account
        if not out.exists():
            meshctl(
                "ca", "issue", "--dir", str(self.data / "registry" / "ca"), "--namespace",
                "default", "--service-account", account, "--out", str(out),
            )  # fmt: skip
        return out

    def apply(self, v1: int, v2: int) -> None:
        path = self.data / f"policy-{v1}-{v2}.yaml"
        path.write_text(policy(v1, v2))
        assert "applied version" in meshctl("apply", "-f", str(path), env=self.admin)

    def workload(self, name: str, service: str, account: str) -> Child:
        env = {
            "MESHLIB_REGISTRY": self.url,
            "MESHLIB_SERVICE": service,
            "MESHLIB_SVID_DIR": str(self.svid(account)),
            "MESHLIB_CACHE_DIR": str(self.data / "cache" / name),
        }
        child = self.spawn(name, [sys.executable, str(WORKLOAD), "--seed", "11"], env)
        self.children[name] = child
        return child

    def started(self, *names: str) -> None:
        """Wait for each workload's ``serving SERVICE on https://HOST:PORT`` line."""
        for name in names:
            self.addresses[name] = self.children[name].line("serving ").rsplit("/", 1)[1]

    def client(self) -> RegistryClient:
        return RegistryClient(self.url, svid_dir=self.admin["MESHLIB_SVID_DIR"])


@pytest.fixture
def cluster(tmp_path: Path, spawn: Callable[..., Child]) -> Cluster:
    """A registry process (``meshctl registry init`` + ``serve`` on a free port) with the
    100/0 policy applied by ``meshctl apply``."""
    reg = tmp_path / "registry"
    meshctl("registry", "init", "--data", str(reg), "--trust-domain", TD)
    serve = [sys.executable, "-m", "meshlib.cli", "registry", "serve", "--data", str(reg)]
    registry = spawn("registry", [*serve, "--listen", "127.0.0.1:0"])
    url = registry.line("registry serving on ").split()[3]
    admin = {"MESHLIB_REGISTRY": url, "MESHLIB_SVID_DIR": str(reg / "admin")}
    found = Cluster(tmp_path, url, admin, spawn)
    found.apply(100, 0)
    return found


@pytest.fixture
def loadgen(cluster: Cluster) -> Iterator[meshlib.Mesh]:
    mesh = meshlib.Mesh.from_registry(
        cluster.url,
        service="loadgen",
        svid_dir=cluster.svid("loadgen"),
        cache_dir=cluster.data / "cache" / "loadgen",
        metrics=False,
    )
    yield mesh
    mesh.close()


def endpoints(mesh: meshlib.Mesh, service: str) -> set[str]:
    found = mesh.discovered().get(f"{service}.default")
    return set() if found is None else {e.address for e in found.endpoints}


def within_5_sigma(hits: int, n: int, p: float) -> bool:
    return abs(hits / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


def start_in_order(cluster: Cluster, callees: dict[str, str]) -> None:
    """Start ``callees`` (name → service, account ``reviews``), wait until the registry lists
    them, then start productpage: its start-up fetch finds them, so its first request has
    somewhere to go. Started together, productpage would answer 502 until its watch saw them
    (about a second), and those 502s open the caller's breaker on productpage for 30 s."""
    for name, service in callees.items():
        cluster.workload(name, service, "reviews")
    cluster.started(*callees)
    with cluster.client() as admin:
        assert until(lambda: len(admin.instances()) == len(callees), 20)
    cluster.workload("productpage", "productpage", "productpage")
    cluster.started("productpage")


def test_three_services_on_three_processes_discover_each_other(
    cluster: Cluster, loadgen: meshlib.Mesh
) -> None:
    start_in_order(cluster, {"reviews-v1": "reviews-v1", "reviews-v2": "reviews-v2"})
    with cluster.client() as admin:
        assert until(lambda: len(admin.instances()) == 3, 20)
        rows = {row.service: f"{row.address}:{row.port}" for row in admin.instances()}
        assert rows == {
            "productpage": cluster.addresses["productpage"],
            "reviews-v1": cluster.addresses["reviews-v1"],
            "reviews-v2": cluster.addresses["reviews-v2"],
        }
        assert until(lambda: endpoints(loadgen, "productpage") == {rows["productpage"]}, 20)
        # productpage found reviews-v1 through the registry too: its answer names the instance
        with loadgen.client(timeout=5.0) as client:
            answer = client.get("http://productpage/productpage")
        assert answer.status_code == 200, answer.text
        assert answer.json()["reviews"] == {
            "service": "reviews-v1",
            "instance": rows["reviews-v1"],
            # the identity reviews-v1 verified on the mTLS call: productpage's SVID
            "caller": f"spiffe://{TD}/ns/default/sa/productpage",
        }
        # every workload applied the registry's version 1 (its ACK rides the heartbeats)
        assert until(lambda: all(r.applied_version == 1 for r in admin.instances()), 15)


def test_a_canary_applied_with_meshctl_shifts_live_traffic_within_seconds(
    cluster: Cluster, loadgen: meshlib.Mesh, traffic: Callable[[meshlib.Mesh], Traffic]
) -> None:
    start_in_order(cluster, {"reviews-v1": "reviews-v1", "reviews-v2": "reviews-v2"})
    assert until(
        lambda: endpoints(loadgen, "productpage") == {cluster.addresses["productpage"]}, 20
    )
    live = traffic(loadgen)
    assert until(lambda: sum(c.ok for c in live.snapshot()) >= 100, 30)
    assert {c.service for c in live.snapshot() if c.ok} == {"reviews-v1"}  # 100/0

    cluster.apply(50, 50)  # meshctl apply, a subprocess, as an operator would
    with cluster.client() as admin:
        accepted = max(admin.history(), key=lambda v: v.version).created_at
    assert accepted is not None

    def first_v2() -> float | None:
        hits = [c.wall for c in live.snapshot() if c.service == "reviews-v2"]
        return min(hits) if hits else None

    assert until(lambda: first_v2() is not None, 15), "no call reached reviews-v2"
    shift = first_v2()
    assert shift is not None
    print(f"\napply → first call on reviews-v2: {shift - accepted:.3f} s")
    assert shift - accepted < 5.0  # the policy watch wakes on the version, not a poll

    # After the shift, live traffic follows 50/50 (binomial, 5 sigma).
    start = len(live.snapshot())
    assert until(lambda: live.count() >= start + 300, 30)
    after = [c for c in live.snapshot()[start:] if c.ok]
    v2 = sum(c.service == "reviews-v2" for c in after)
    print(f"after the shift: reviews-v2 {v2} of {len(after)} calls")
    assert within_5_sigma(v2, len(after), 0.5), (v2, len(after))
    assert all(c.ok for c in live.snapshot()), [c.error for c in live.snapshot() if not c.ok][:3]


def test_a_killed_instance_moves_within_one_ttl_with_zero_failed_calls(
    cluster: Cluster, loadgen: meshlib.Mesh, traffic: Callable[[meshlib.Mesh], Traffic]
) -> None:
    start_in_order(cluster, {"reviews-v1-a": "reviews-v1", "reviews-v1-b": "reviews-v1"})
    victim, survivor = cluster.addresses["reviews-v1-a"], cluster.addresses["reviews-v1-b"]
    assert until(lambda: endpoints(loadgen, "reviews-v1") == {victim, survivor}, 20)
    assert until(lambda: bool(endpoints(loadgen, "productpage")), 20)
    live = traffic(loadgen)
    # both instances serve before the kill
    assert until(lambda: {c.instance for c in live.snapshot() if c.ok} == {victim, survivor}, 30)

    cluster.children["reviews-v1-a"].signal(signal.SIGKILL)  # no drain: only the TTL knows
    killed_at = time.time()
    cluster.children["reviews-v1-a"].popen.wait(timeout=10)
    with cluster.client() as admin:  # dead now: its last heartbeat is final
        (row,) = [r for r in admin.instances() if f"{r.address}:{r.port}" == victim]
        last_beat = time.time() - row.last_heartbeat_age
    assert until(lambda: victim not in endpoints(loadgen, "reviews-v1"), TTL + TICK + 5)
    gone_at = time.time()
    print(
        f"\nSIGKILL → gone from the callers' endpoints: {gone_at - killed_at:.2f} s; "
        f"last heartbeat → gone: {gone_at - last_beat:.2f} s (TTL {TTL:.0f} s)"
    )
    # One TTL after its last heartbeat, the registry's next expiry pass (every second)
    # removes it and the callers' blocking query wakes (+1 s for three busy processes).
    assert gone_at - last_beat <= TTL + TICK + 1.0
    count = live.count()
    assert until(lambda: live.count() >= count + 50, 30)  # traffic goes on without it
    live.stop()
    after = [c for c in live.snapshot() if c.wall >= killed_at]
    failed = [c.error for c in after if not c.ok]
    print(f"failed calls since the kill: {len(failed)} of {len(after)}")
    assert not failed, failed[:3]
    assert len(after) >= 50
    # the dead process answered nothing after it died; the survivor carried its share
    assert {c.instance for c in after[-50:]} == {survivor}
    with cluster.client() as admin:
        assert sorted(r.service for r in admin.instances()) == ["productpage", "reviews-v1"]
