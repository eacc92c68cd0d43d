"""Registry replicas end to end (issue 13): a real 3-node etcd cluster, ``meshctl registry serve
--store etcd`` replicas sharing one ``registry init`` data dir, workloads
(examples/registry_workload.py) listing every replica in ``MESHLIB_REGISTRY``, and the test
process as a caller (service ``loadgen``) driving GETs into productpage, which calls ``reviews``.
Every process runs in its own process group and is stopped by the fixtures' finalizers.

The failures: the etcd leader SIGKILLed under steady writes, a replica SIGKILLed under its
watchers, a compaction passing a replica's watch, a workload SIGKILLed (its TTL), quorum lost
and back, and two replicas racing one ``If-Match`` apply. Measured figures are printed
(``pytest -s``); docs/control-plane.md ("Failure tests") quotes them.
"""

from __future__ import annotations

import base64
import json
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from etcd_cluster import EtcdCluster, EtcdNode
from harness.processes import Child, Processes, Traffic, until

import meshlib
from meshlib.cli.registry import RegistryDir, init_registry_dir
from meshlib.control.client import (
    RegistryClient,
    RegistryConflict,
    RegistryError,
    RegistryUnavailable,
)
from meshlib.control.registry import instance_id

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = ROOT / "examples" / "registry_workload.py"
TD = "replicas.test"
NS = "default"
#: ``--instance-ttl``: workloads heartbeat every TTL/3 (1 s); a replica warms for one TTL.
TTL = 3.0
#: The replicas' expiry pass period and their wake-up debounce's upper bound (quiet 0.1 s).
TICK, DEBOUNCE = 1.0, 1.0

POLICY = (
    "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: replicas}\n"
    f"spec: {{trustDomain: {TD}, mtls: strict}}\n"
    + "".join(
        f"---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {{name: {name}}}\n"
        f"spec: {{serviceAccount: {name}}}\n"
        for name in ("loadgen", "productpage", "reviews")
    )
)


@dataclass
class Replicas:
    """One etcd cluster, one registry data dir, replicas and workloads over them."""

    etcd: EtcdCluster
    reg: RegistryDir
    procs: Processes
    urls: dict[str, str] = field(default_factory=dict)
    children: dict[str, Child] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    meshes: list[meshlib.Mesh] = field(default_factory=list)

    def serve(self, name: str, etcd: list[EtcdNode] | None = None) -> str:
        """Start replica ``name`` over ``etcd`` (in this order; default the cluster's)."""
        urls = [n.client_url for n in etcd] if etcd else self.etcd.endpoints
        argv = [sys.executable, "-m", "meshlib.cli", "registry", "serve"]
        argv += ["--data", str(self.reg.path), "--listen", "127.0.0.1:0", "--store", "etcd"]
        argv += ["--etcd", ",".join(urls), "--instance-ttl", f"{TTL:g}s"]
        child = self.procs.start(name, argv)
        self.children[name] = child
        self.urls[name] = child.line("registry serving on ").split()[3]
        return self.urls[name]

    def client(self, *names: str) -> RegistryClient:
        """meshctl's admin client of replicas ``names`` (in this order)."""
        return RegistryClient(
            [self.urls[n] for n in names], svid_dir=str(self.reg.admin_svid), timeout=3.0
        )

    def svid(self, account: str) -> Path:
        out = self.reg.path.parent / "svids" / account
        return out if out.exists() else self.reg.issue(NS, account, out)

    def workload(self, name: str, service: str, registry: list[str]) -> Child:
        env = {
            "MESHLIB_REGISTRY": ",".join(self.urls[r] for r in registry),
            "MESHLIB_SERVICE": service,
            "MESHLIB_SVID_DIR": str(self.svid(service)),
            "MESHLIB_CACHE_DIR": str(self.reg.path.parent / "cache" / name),
        }
        child = self.procs.start(name, [sys.executable, str(WORKLOAD), "--seed", "13"], env)
        self.children[name] = child
        self.addresses[name] = child.line("serving ").rsplit("/", 1)[1]
        return child

    def listed(self, replica: str, service: str) -> set[str]:
        """``service``'s endpoint addresses as replica ``replica`` answers them."""
        with self.client(replica) as admin:
            answer = admin.endpoints(NS, service)
        return {f"{e.address}:{e.port}" for e in answer.endpoints}

    def bookinfo(self, registry: list[str]) -> None:
        """reviews-a and reviews-b, then (once every replica lists them) productpage: callees
        before callers, so productpage's first calls have somewhere to go."""
        for name in ("reviews-a", "reviews-b"):
            self.workload(name, "reviews", registry)
        both = {self.addresses["reviews-a"], self.addresses["reviews-b"]}
        for replica in self.urls:
            assert until(lambda r=replica: self.listed(r, "reviews") == both, 20), replica
        self.workload("productpage", "productpage", registry)
        for replica in self.urls:
            pp = {self.addresses["productpage"]}
            assert until(lambda r=replica, w=pp: self.listed(r, "productpage") == w, 20), replica

    def loadgen(self, registry: list[str]) -> meshlib.Mesh:
        mesh = meshlib.Mesh.from_registry(
            [self.urls[r] for r in registry],
            service="loadgen",
            svid_dir=self.svid("loadgen"),
            cache_dir=self.reg.path.parent / "cache" / "loadgen",
            metrics=False,
        )
        self.meshes.append(mesh)
        pp = self.addresses["productpage"]
        assert until(lambda: endpoints(mesh, "productpage") == {pp}, 20)
        return mesh


def endpoints(mesh: meshlib.Mesh, service: str) -> set[str]:
    found = mesh.discovered().get(f"{service}.{NS}")
    return set() if found is None else {e.address for e in found.endpoints}


@pytest.fixture
def replicas(tmp_path: Path, etcd3: EtcdCluster) -> Iterator[Replicas]:
    """``registry init`` (in this process) and the policy-to-be; replicas start in the test."""
    procs = Processes(tmp_path)
    found = Replicas(etcd3, init_registry_dir(tmp_path / "registry", TD), procs)
    yield found
    for mesh in found.meshes:
        mesh.close()
    procs.stop()


def steady(found: Traffic, calls: int = 30) -> None:
    """Wait for ``calls`` more calls (the traffic flows through what just happened)."""
    start = found.count()
    assert until(lambda: found.count() >= start + calls, 30), "traffic stalled"


def etcd_post(node: EtcdNode, path: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        node.client_url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def stored_instances(node: EtcdNode) -> set[str]:
    """The instance ids stored in etcd (read straight from the cluster, not via a replica)."""
    prefix = "/registry/instances/"
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    answer = etcd_post(node, "/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)})
    kvs = answer.get("kvs", [])
    assert isinstance(kvs, list)
    return {json.loads(base64.b64decode(kv["value"]))["id"] for kv in kvs}


def churn_id(port: int, service: str = "churn") -> str:
    return instance_id(NS, service, "127.0.0.9", port)


class Writes:
    """A register/deregister loop through ``client`` (steady writes; closed by :meth:`stop`),
    recording the wall-clock time of every write that succeeded."""

    def __init__(self, client: RegistryClient, service: str = "churn") -> None:
        self.ok: list[float] = []
        self.failed = 0
        self._client = client
        self._service = service
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        port = 20000
        while not self._stop.is_set():
            port += 1
            try:
                self._client.register(NS, self._service, "127.0.0.9", port, ttl=60)
                self.ok.append(time.time())
                self._client.deregister(NS, self._service, churn_id(port, self._service))
                self.ok.append(time.time())
            except RegistryError:
                self.failed += 1
            self._stop.wait(0.05)  # pacing: ~10 writes a second

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self._client.close()


# -- 1. the etcd leader dies ---------------------------------------------------------------------


def test_the_etcd_leader_dies_under_writes_and_calls(
    replicas: Replicas, traffic: Callable[[meshlib.Mesh], Traffic]
) -> None:
    leader = replicas.etcd.leader()
    # the leader first in both replicas' lists: their mirrors' watches run on it when it dies
    order = [leader] + [n for n in replicas.etcd.nodes if n is not leader]
    replicas.serve("A", order)
    replicas.serve("B", order)
    with replicas.client("A") as admin:
        admin.apply(POLICY)
    replicas.bookinfo(["A", "B"])
    live = traffic(replicas.loadgen(["B", "A"]))
    steady(live)
    writes = Writes(replicas.client("A"))
    assert until(lambda: len(writes.ok) >= 10, 20)
    leader.kill()
    killed = time.time()
    assert until(lambda: any(t > killed for t in writes.ok), 15), "writes did not resume"
    gap = min(t for t in writes.ok if t > killed) - killed
    print(f"\netcd leader SIGKILL → first write accepted again: {gap:.2f} s")
    assert gap < 5.0  # a 500 ms election, then the store's next endpoint

    # a watcher on B, held from B's current index, sees a registration made through A
    with replicas.client("A") as writer, replicas.client("B") as watcher:
        before = watcher.endpoints(NS, "late")
        held: list[set[str]] = []

        def hold() -> None:
            answer = watcher.endpoints(NS, "late", index=before.index, wait=15)
            held.append({f"{e.address}:{e.port}" for e in answer.endpoints})

        holder = threading.Thread(target=hold)
        holder.start()
        writer.register(NS, "late", "127.0.0.8", 8080, ttl=60)
        holder.join(timeout=20)
    writes.stop()
    assert held == [{"127.0.0.8:8080"}]
    steady(live)
    live.stop()
    failed = live.failed()
    print(f"failed mesh calls: {len(failed)} of {live.count()}; writes refused: {writes.failed}")
    assert not failed, failed[:3]


# -- 2. a replica dies ---------------------------------------------------------------------------


def test_a_replica_dies_and_its_watchers_move_to_another(
    replicas: Replicas, traffic: Callable[[meshlib.Mesh], Traffic]
) -> None:
    replicas.serve("A")
    replicas.serve("B")
    with replicas.client("A") as admin:
        admin.apply(POLICY)
    replicas.bookinfo(["A", "B"])  # everyone watches through A first
    loadgen = replicas.loadgen(["A", "B"])
    live = traffic(loadgen)
    steady(live)

    replicas.children["A"].kill()
    killed = time.time()
    steady(live)
    # a reviews instance started now registers through B, and reaches A's former watchers:
    # the caller's discovery and productpage's (which then calls it)
    replicas.workload("reviews-c", "reviews", ["A", "B"])
    new = replicas.addresses["reviews-c"]
    assert until(lambda: new in endpoints(loadgen, "reviews"), 20)
    assert until(lambda: any(c.instance == new for c in live.snapshot()), 20)
    moved = min(c.wall for c in live.snapshot() if c.instance == new)
    print(f"\nreplica SIGKILL → a new instance serving the callers: {moved - killed:.2f} s")
    live.stop()
    failed = live.failed()
    print(f"failed mesh calls: {len(failed)} of {live.count()}")
    assert not failed, failed[:3]


# -- 3. compaction under a live watch ------------------------------------------------------------


def test_a_compacted_watch_lists_again_and_every_replica_agrees_with_the_store(
    replicas: Replicas,
) -> None:
    x, y, z = sorted(replicas.etcd.nodes, key=lambda n: n is replicas.etcd.leader())
    replicas.serve("A", [y, z, x])
    replicas.serve("B", [x, y, z])  # B's mirror watches on x
    with replicas.client("A") as writer:
        for port in range(20):
            writer.register(NS, "churn", "127.0.0.9", 30000 + port, ttl=300)
        for replica in ("A", "B"):
            assert until(lambda r=replica: len(replicas.listed(r, "churn")) == 20, 10)

        # B stops; its etcd member dies (so its watch stream breaks); meanwhile half the
        # instances go, others come, and etcd compacts past everything B saw
        replicas.children["B"].signal(signal.SIGSTOP)
        x.kill()
        for port in range(10):
            writer.deregister(NS, "churn", churn_id(30000 + port))
            writer.register(NS, "churn", "127.0.0.9", 31000 + port, ttl=300)
    head = etcd_post(y, "/v3/kv/range", {"key": b64("/registry/epoch")})["header"]
    assert isinstance(head, dict)
    etcd_post(y, "/v3/kv/compaction", {"revision": head["revision"], "physical": True})
    replicas.children["B"].signal(signal.SIGCONT)
    resumed = time.time()

    stored = stored_instances(y)
    assert len(stored) == 20
    compacted = "the mirror's watch was compacted: listing again"
    assert until(lambda: compacted in replicas.children["B"].stderr(), 15), "no Compacted"

    def ids(replica: str) -> set[str]:
        with replicas.client(replica) as admin:
            return {row.id for row in admin.instances()}

    for replica in ("A", "B"):
        assert until(lambda r=replica: ids(r) == stored, 15), (replica, ids(replica) ^ stored)
    print(f"\ncompacted watch → replica B equal to the store: {time.time() - resumed:.2f} s")
    x.start()  # back, and every replica still agrees with the store
    for replica in ("A", "B"):
        with replicas.client(replica) as admin:
            answer = admin.endpoints(NS, "churn")
        assert {f"{e.address}:{e.port}" for e in answer.endpoints} == {
            f"127.0.0.9:{31000 + p if p < 10 else 30000 + p}" for p in range(20)
        }


# -- 4. a dead instance leaves every replica -----------------------------------------------------


def test_a_dead_instance_leaves_every_replica_within_ttl_tick_and_debounce(
    replicas: Replicas,
) -> None:
    replicas.serve("A")
    replicas.serve("B")
    with replicas.client("A") as admin:
        admin.apply(POLICY)
    victim = replicas.workload("reviews-a", "reviews", ["A", "B"])
    address = replicas.addresses["reviews-a"]
    for replica in ("A", "B"):  # both past warming (one TTL): expiry runs
        assert until(lambda r=replica: replicas.listed(r, "reviews") == {address}, 20)
        with replicas.client(replica) as admin:
            assert until(lambda a=admin: a.status().state == "serving", 2 * TTL + 5)

    gone: dict[str, float] = {}

    def watch(replica: str) -> None:
        """A blocking query on ``replica`` (as a workload's watch), until the victim is gone."""
        with replicas.client(replica) as admin:
            answer = admin.endpoints(NS, "reviews")
            deadline = time.monotonic() + 3 * TTL + 10
            while answer.endpoints and time.monotonic() < deadline:
                answer = admin.endpoints(NS, "reviews", index=answer.index, wait=5)
            if not answer.endpoints:
                gone[replica] = time.time()

    watchers = [threading.Thread(target=watch, args=(r,)) for r in ("A", "B")]
    for thread in watchers:
        thread.start()
    victim.kill()  # no drain: only the TTL knows
    killed = time.time()
    with replicas.client("A") as admin:  # dead now: its last heartbeat is final
        (row,) = [r for r in admin.instances() if r.service == "reviews"]
        last_beat = time.time() - row.last_heartbeat_age
    for thread in watchers:
        thread.join(timeout=3 * TTL + 15)
    assert set(gone) == {"A", "B"}, gone
    print()
    for replica, at in sorted(gone.items()):
        print(
            f"replica {replica}: SIGKILL → gone from its watchers {at - killed:.2f} s, "
            f"last heartbeat → gone {at - last_beat:.2f} s (TTL {TTL:g} s)"
        )
        # The TTL counts from the last *persisted* beat (a replica persists a beat once TTL/3
        # passed since the previous one), so it may end up to TTL/3 before the last beat's
        # TTL, never sooner (a live instance stays). Then the next expiry pass and the
        # debounced wake-up; + 1 s for busy processes.
        assert TTL * 2 / 3 - TICK <= at - last_beat <= TTL + TICK + DEBOUNCE + 1.0


# -- 5. quorum loss ------------------------------------------------------------------------------


def test_quorum_loss_refuses_writes_serves_reads_and_calls_go_on(
    replicas: Replicas, traffic: Callable[[meshlib.Mesh], Traffic]
) -> None:
    replicas.serve("A")
    replicas.serve("B")
    with replicas.client("A") as admin:
        admin.apply(POLICY)
    replicas.bookinfo(["A", "B"])
    live = traffic(replicas.loadgen(["A", "B"]))
    steady(live)

    leader = replicas.etcd.leader()
    lost = [next(n for n in replicas.etcd.nodes if n is not leader), leader]
    for node in lost:
        node.kill()
    down = time.time()
    refusals: list[RegistryUnavailable] = []

    def refused(replica: str) -> bool:
        with replicas.client(replica) as admin:
            try:
                admin.register(NS, "churn", "127.0.0.9", 40000, ttl=60)
            except RegistryUnavailable as exc:
                refusals.append(exc)
                return exc.status == 503
        return False

    for replica in ("A", "B"):
        assert until(lambda r=replica: refused(r), 15), replica
        assert refusals[-1].retry_after == 1.0, refusals[-1]

        def unauthoritative(r: str = replica) -> bool:
            with replicas.client(r) as admin:
                answer = admin.endpoints(NS, "reviews")  # a read: still answered
            return not answer.authoritative and len(answer.endpoints) == 2

        assert until(unauthoritative, 10), replica
    print(f"\nquorum lost → both replicas refuse writes: {time.time() - down:.2f} s")
    steady(live, 60)  # the callers keep routing on what they know

    for node in lost:
        node.start()
    back = time.time()

    def writable() -> bool:
        with replicas.client("A", "B") as admin:
            try:
                admin.register(NS, "churn", "127.0.0.9", 40001, ttl=60)
            except RegistryUnavailable:
                return False
        return True

    assert until(writable, 30), "writes did not come back"
    print(f"quorum back → first write accepted: {time.time() - back:.2f} s")
    for replica in ("A", "B"):
        with replicas.client(replica) as admin:
            assert until(lambda a=admin: a.endpoints(NS, "reviews").authoritative, 2 * TTL + 5)
            assert len(admin.endpoints(NS, "reviews").endpoints) == 2  # nobody expired
    steady(live)
    live.stop()
    failed = live.failed()
    print(f"failed mesh calls: {len(failed)} of {live.count()}")
    assert not failed, failed[:3]


# -- 6. two replicas race one If-Match apply -----------------------------------------------------


def race(replicas: Replicas, version: int, round_: int) -> dict[str, object]:
    """``PUT /v1/policy`` with ``If-Match: version`` to A and B at once: what each answered."""
    gate = threading.Barrier(2)
    results: dict[str, object] = {}

    def apply(replica: str) -> None:
        text = POLICY + f"# round {round_} through {replica}\n"
        with replicas.client(replica) as admin:
            gate.wait(timeout=10)
            try:
                results[replica] = admin.apply(text, if_match=version)
            except RegistryConflict as exc:
                results[replica] = exc

    racers = [threading.Thread(target=apply, args=(r,)) for r in ("A", "B")]
    for thread in racers:
        thread.start()
    for thread in racers:
        thread.join(timeout=20)
    return results


def test_two_replicas_racing_one_if_match_apply_exactly_one_wins(replicas: Replicas) -> None:
    replicas.serve("A")
    replicas.serve("B")
    with replicas.client("A") as admin:
        first = version = admin.apply(POLICY).version
    for round_ in range(5):
        for replica in ("A", "B"):  # both replicas' mirrors are at ``version``
            with replicas.client(replica) as admin:
                assert until(lambda a=admin, v=version: a.policy().version == v, 10)
        results = race(replicas, version, round_)
        conflicts = [r for r, got in results.items() if isinstance(got, RegistryConflict)]
        wins = [r for r, got in results.items() if not isinstance(got, RegistryConflict)]
        assert len(wins) == 1 and len(conflicts) == 1, results
        conflict = results[conflicts[0]]
        assert isinstance(conflict, RegistryConflict) and conflict.status == 409
        version += 1
    with replicas.client("A") as admin:
        versions = sorted(v.version for v in admin.history())
    assert versions == list(range(first, version + 1))
