"""The registry at scale (issue 13): propagation with 10,000 instances and 1,000 watchers, and a
restart storm of 1,000 clients, on SQLite or on a 3-node etcd cluster with 2 registry replicas.

    python benchmarks/registry_scale.py [--store sqlite|etcd] [--quick] [--json out.json]

Everything is real: ``meshctl registry serve`` subprocesses (pinned to the first core), HTTPS
with mutual TLS, :class:`meshlib.control.client.AsyncRegistryClient` as the only client, and
for ``--store etcd`` an etcd cluster started on free loopback ports in a temporary directory
(``--etcd-nodes``, default 3) with ``--replicas`` (default 2) registry processes over it. The
load generator is this process (pinned to the other cores): asyncio tasks, not processes, so
what it costs is reported beside the figures.

**A. Propagation at scale.** ``--instances`` instances across ``--services`` services are
registered (TTL ``--ttl``) and kept alive by heartbeats every ``heartbeat_interval`` of the
register answer (± 10 %, as the registrar), an instance whose beat gets a 404 registering again,
through 8 clients with at most 8 requests in flight each (a host's handful, not one connection
per instance: the client's pool has no cap);
``--watchers`` long-polls (``?index=N&wait=60s``) spread over the services and over the
replicas. Once every watcher holds a query, the measured phase: ``--changes`` registrations of
new instances at ``--rate`` per second (open loop, seeded random services that have watchers,
sent round-robin to the replicas); a registration's propagation is the time from sending it to
the moment the LAST watcher of its service holds an answer that lists the instance. Over the
phase: each registry process's CPU (utime + stime from ``/proc/PID/stat``) and RSS
(``/proc/PID/status``), the store's writes per second (its revision delta: SQLite's ``meta``
revision read from a read-only connection, etcd's ``/v3/maintenance/status`` revision), the
store's size and the bytes of the instance records, and this process's CPU.

**B. Restart storm.** Every client of A stops; the registry processes restart (SIGTERM, then the
same command on the same port and store: the instances are still in the store); then
``--clients`` fresh clients start at once, each with its own ``AsyncRegistryClient`` (its own
connections and TLS handshakes), its share of the instances (registered again at once, as the
registrar's first attempt is, one at a time per client over one connection — the real registrar
sends its instances' registers concurrently) and of the watchers, each watch driven by the
discovery loop's own rules (:class:`meshlib.control.discovery.WatchRules`: the first-request
jitter, the token bucket, the full-jitter back-off honouring ``Retry-After``; failed registers
back off with the registrar's :func:`meshlib.control.registrar.plan`). Measured: the time until
every watcher has an answer and every instance is registered again ("steady state"), the peak of
the registry's CPU and of its held queries (``/v1/status`` sampled every 0.25 s from a thread of
its own), and every answer that was not 2xx, by status (a 5xx or a connection error is a failure
the target forbids; 429 is load shedding). Twice: with the discovery loop's default first-
request jitter (``Pacing()``: uniform 0–1 s) and without it (``Pacing(first_jitter=0)``), with a
restart before each.

Markdown goes to stdout, progress to stderr, every number to ``--json`` (default
``benchmarks/results/registry_scale-<store>.json``). Every process it starts is stopped.
Importing this module has no side effects; everything happens in :func:`main`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.nginx import free_port  # noqa: E402
from benchmarks.registry import cpu_seconds, machine_info, percentile, split_cores  # noqa: E402

NS = "scale"
#: How long a watcher's query may be held: no query ends by its wait inside a measurement.
WAIT = 60.0
#: Watchers per client in A (each held query has its own connection: the pool has no cap).
WATCHERS_PER_CLIENT = 50
#: Clients the instances of A register and beat through.
BEAT_CLIENTS = 8
#: Requests in flight at once per beating client (each is a connection: the pool has no cap).
IN_FLIGHT = 8
#: A storm client's registrar registers its instances one at a time over one connection.
STORM_REGISTERS_IN_FLIGHT = 1
TARGET_PROPAGATION_P99_MS = 500.0
TARGET_STORM_S = 30.0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _address(n: int) -> tuple[str, int]:
    """A distinct (address, port) for instance number ``n``."""
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}", 8000 + n // 16_777_216


def _service(n: int, services: int) -> str:
    return f"svc{n % services}"


# -- etcd --------------------------------------------------------------------------------------


@dataclass
class Etcd:
    """The etcd cluster of ``tests/etcd_cluster.py`` (free loopback ports, the documented
    flags, every member stopped by :meth:`stop`) and what the benchmark reads from it."""

    cluster: Any

    @classmethod
    def start(cls, base: Path, size: int) -> Etcd:
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd not installed: apt-get install etcd-server")
        tests = str(REPO_ROOT / "tests")
        if tests not in sys.path:
            sys.path.insert(0, tests)
        from etcd_cluster import EtcdCluster

        return cls(EtcdCluster.start(base, size))

    @property
    def endpoints(self) -> list[str]:
        return list(self.cluster.endpoints)

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [node.process for node in self.cluster.nodes if node.process is not None]

    def status(self) -> dict[str, Any]:
        """The first node's ``/v3/maintenance/status`` that answers (revision, dbSize)."""
        import httpx

        for endpoint in self.endpoints:
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.post(f"{endpoint}/v3/maintenance/status", json={}, timeout=5)
                answer.raise_for_status()
                found: dict[str, Any] = answer.json()
                return found
        raise RuntimeError("no etcd node answered /v3/maintenance/status")

    def prefix_bytes(self, prefix: str) -> tuple[int, int]:
        """(keys, bytes of keys + values) under ``prefix``."""
        import httpx

        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        answer = httpx.post(
            f"{self.endpoints[0]}/v3/kv/range",
            json={"key": _b64(prefix), "range_end": _b64(end)},
            timeout=30,
        )
        answer.raise_for_status()
        kvs = answer.json().get("kvs", [])
        size = sum(
            len(base64.b64decode(kv["key"])) + len(base64.b64decode(kv.get("value", "")))
            for kv in kvs
        )
        return len(kvs), size

    def cpu_seconds(self) -> list[float]:
        """utime + stime per etcd process (they share the registry's core)."""
        return [cpu_seconds(process.pid) for process in self.processes]

    def stop(self) -> None:
        self.cluster.stop()


def _reason(exc: Exception) -> str:
    """A failed request's status and the start of its message (connection errors are 0)."""
    status = getattr(exc, "status", -1)
    return f"{status} {str(exc)[:80]}" if status == 0 else str(status)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- the registry processes --------------------------------------------------------------------


@dataclass
class Registries:
    """``meshctl registry serve`` processes on one data dir (one for SQLite, ``replicas`` over
    etcd), each on its own fixed port so a restart comes back where clients look."""

    data: Path
    store: str
    core: set[int]
    etcd: Etcd | None
    replicas: int
    ports: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    restarts: int = 0

    @property
    def urls(self) -> list[str]:
        return [f"https://127.0.0.1:{port}" for port in self.ports]

    @property
    def admin_svid(self) -> str:
        return str(self.data / "admin")

    def init(self) -> None:
        init = subprocess.run(
            [
                sys.executable,
                "-m",
                "meshlib.cli",
                "registry",
                "init",
                "--data",
                str(self.data),
                "--trust-domain",
                "bench.test",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if init.returncode != 0:
            raise RuntimeError(f"meshctl registry init failed: {init.stderr.strip()}")
        self.ports = [free_port() for _ in range(self.replicas)]

    def start(self) -> None:
        store = ["--store", self.store]
        if self.etcd is not None:
            store += ["--etcd", ",".join(self.etcd.endpoints)]
        for i, port in enumerate(self.ports):
            log = (self.data.parent / f"registry{i}.{self.restarts}.log").open("wb")
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meshlib.cli",
                    "registry",
                    "serve",
                    "--data",
                    str(self.data),
                    *store,
                    "--listen",
                    f"127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            # every thread the child starts later inherits the mask
            os.sched_setaffinity(process.pid, self.core)
            self.processes.append(process)
        for url in self.urls:
            self._wait_ready(url)

    def _wait_ready(self, url: str, timeout: float = 60.0) -> None:
        from meshlib.control.client import RegistryClient, RegistryError

        deadline = time.monotonic() + timeout
        with RegistryClient(url, svid_dir=self.admin_svid, timeout=2.0) as client:
            while True:
                for process in self.processes:
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"a registry process exited at start ({process.returncode}); "
                            f"see {self.data.parent}/registry*.log"
                        )
                try:
                    client.status()
                    return
                except RegistryError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the registry at {url} did not answer") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []

    def restart(self) -> None:
        self.stop()
        self.restarts += 1
        self.start()

    def cpu_seconds(self) -> list[float]:
        """utime + stime of every thread, per process."""
        return [cpu_seconds(process.pid) for process in self.processes]

    def etcd_cpu_seconds(self) -> list[float]:
        return [] if self.etcd is None else self.etcd.cpu_seconds()

    def memory_mb(self) -> list[dict[str, float]]:
        """VmRSS and VmHWM (peak RSS) per process, MB."""
        found = []
        for process in self.processes:
            status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
            kb = {
                k: int(v.split()[0])
                for k, v in (line.split(":", 1) for line in status)
                if k in ("VmRSS", "VmHWM")
            }
            found.append({"rss_mb": kb["VmRSS"] / 1024, "peak_rss_mb": kb["VmHWM"] / 1024})
        return found

    def store_revision(self) -> int:
        if self.etcd is not None:
            return int(self.etcd.status()["header"]["revision"])
        with contextlib.closing(
            sqlite3.connect(f"file:{self.data / 'registry.db'}?mode=ro", uri=True)
        ) as db:
            row = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
            return int(row[0]) if row else 0

    def store_size(self) -> dict[str, int]:
        """The store's bytes on disk and the instance records' bytes (keys + values)."""
        prefix = "/registry/instances/"
        if self.etcd is not None:
            keys, size = self.etcd.prefix_bytes(prefix)
            return {
                "db_bytes": int(self.etcd.status()["dbSize"]),
                "instances": keys,
                "instance_bytes": size,
            }
        db_path = self.data / "registry.db"
        on_disk = sum(
            p.stat().st_size for p in (db_path, db_path.with_name("registry.db-wal")) if p.exists()
        )
        with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
            keys, size = db.execute(
                "SELECT count(*), coalesce(sum(length(key) + length(value)), 0) FROM kv "
                "WHERE key >= ? AND key < ?",
                (prefix, prefix[:-1] + "0"),
            ).fetchone()
        return {"db_bytes": on_disk, "instances": int(keys), "instance_bytes": int(size)}


def _own_memory_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- A: the fleet and its watchers -------------------------------------------------------------


@dataclass
class Settings:
    store: str
    instances: int
    services: int
    watchers: int
    clients: int
    changes: int
    rate: float
    ttl: float
    seed: int
    etcd_nodes: int
    replicas: int


class Fleet:
    """The ``instances`` of A: registered, then beating, through a few clients."""

    def __init__(self, registries: Registries, s: Settings) -> None:
        from meshlib.control.client import AsyncRegistryClient

        urls = registries.urls
        self.clients = [
            AsyncRegistryClient(urls[i % len(urls)], svid_dir=registries.admin_svid, timeout=30)
            for i in range(BEAT_CLIENTS)
        ]
        # The client's pool has no cap (a held query per watched service): unbounded, a busy
        # load generator's slow answers open a new mutual-TLS connection per waiting request
        # (3,700 connections and 800 MB of registry RSS in a first run). A beating host has
        # a few requests in flight, so each client here has IN_FLIGHT at most.
        self.slots = [asyncio.Semaphore(IN_FLIGHT) for _ in self.clients]
        self.s = s
        self.rng = random.Random(s.seed)
        self.registered = 0
        self.all_registered = asyncio.Event()
        self.beats = 0
        self.reregistered = 0
        self.errors: Counter[str] = Counter()
        self.tasks: list[asyncio.Task[None]] = []

    async def _register(self, n: int) -> float:
        address, port = _address(n)
        async with self.slots[n % len(self.clients)]:
            answer = await self.clients[n % len(self.clients)].register(
                NS, _service(n, self.s.services), address, port, ttl=self.s.ttl
            )
        return float(answer.heartbeat_interval)

    async def _keep(self, n: int) -> None:
        from meshlib.control.client import RegistryError, RegistryNotFound
        from meshlib.control.registry import instance_id

        while True:
            try:
                interval = await self._register(n)
                break
            except RegistryError as exc:
                self.errors[f"register {_reason(exc)}"] += 1
                await asyncio.sleep(1.0)
        self.registered += 1
        if self.registered % 2000 == 0:
            _log(f"   {self.registered} registered")
        if self.registered == self.s.instances:
            self.all_registered.set()
        delay = self.rng.uniform(0, interval)  # first beats spread over one interval
        address, port = _address(n)
        service = _service(n, self.s.services)
        id = instance_id(NS, service, address, port)
        while True:
            await asyncio.sleep(delay)
            delay = interval * self.rng.uniform(0.9, 1.1)
            try:
                async with self.slots[n % len(self.clients)]:
                    await self.clients[n % len(self.clients)].heartbeat(NS, service, id)
                self.beats += 1
            except RegistryNotFound:  # expired: register again at once, as the registrar does
                self.reregistered += 1
                with contextlib.suppress(RegistryError):
                    await self._register(n)
            except RegistryError as exc:
                self.errors[f"heartbeat {_reason(exc)}"] += 1

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._keep(n)) for n in range(self.s.instances)]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in self.clients:
            await client.aclose()


@dataclass
class Pending:
    """A measured registration: done when ``expected`` watchers have listed ``id``."""

    id: str
    expected: int
    sent: float
    seen: set[int] = field(default_factory=set)
    done_at: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Watchers:
    """``count`` long-polls spread over the services and the registry processes."""

    def __init__(self, registries: Registries, s: Settings) -> None:
        from meshlib.control.client import AsyncRegistryClient

        urls = registries.urls
        self.targets = [_service(w, s.services) for w in range(s.watchers)]
        self.replica = [w % len(urls) for w in range(s.watchers)]
        # per replica, one client per WATCHERS_PER_CLIENT of its watchers
        self.clients: dict[tuple[int, int], Any] = {}
        for w in range(s.watchers):
            key = (self.replica[w], w // (WATCHERS_PER_CLIENT * len(urls)))
            if key not in self.clients:
                self.clients[key] = AsyncRegistryClient(
                    urls[key[0]], svid_dir=registries.admin_svid, timeout=WAIT + 30
                )
        self.answered = [0] * s.watchers
        self.pending: dict[str, dict[str, Pending]] = {}
        self.errors: Counter[str] = Counter()
        self.backwards = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.urls = urls

    def of(self, service: str) -> int:
        return sum(1 for t in self.targets if t == service)

    async def _watch(self, w: int) -> None:
        from meshlib.control.client import RegistryError

        client = self.clients[(self.replica[w], w // (WATCHERS_PER_CLIENT * len(self.urls)))]
        service, index = self.targets[w], 0
        while True:
            try:
                answer = await client.endpoints(NS, service, index=index, wait=WAIT)
            except RegistryError as exc:
                self.errors[_reason(exc)] += 1
                await asyncio.sleep(0.5)
                continue
            now = time.perf_counter()
            self.answered[w] += 1
            if answer.index < index:
                self.backwards += 1
            index = answer.index
            waiting = self.pending.get(service)
            if waiting:
                listed = {e.id for e in answer.endpoints}
                for p in list(waiting.values()):
                    if p.id in listed and w not in p.seen:
                        p.seen.add(w)
                        if len(p.seen) == p.expected:
                            p.done_at = now
                            p.done.set()

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._watch(w)) for w in range(len(self.targets))]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for client in self.clients.values():
            await client.aclose()


async def _held(admins: Sequence[Any]) -> int:
    return sum([(await admin.status()).watchers for admin in admins])


async def propagation(registries: Registries, s: Settings) -> dict[str, Any]:
    from meshlib.control.client import AsyncRegistryClient
    from meshlib.control.registry import instance_id

    admins = [
        AsyncRegistryClient(url, svid_dir=registries.admin_svid, timeout=30)
        for url in registries.urls
    ]
    fleet, watchers = Fleet(registries, s), Watchers(registries, s)
    cpu0, own0, wall0 = registries.cpu_seconds(), time.process_time(), time.perf_counter()
    try:
        _log(f"A. registering {s.instances} instances over {s.services} services ...")
        fleet.start()
        await asyncio.wait_for(fleet.all_registered.wait(), 600)
        fill_s = time.perf_counter() - wall0
        fill_cpu = [b - a for a, b in zip(cpu0, registries.cpu_seconds(), strict=True)]
        fill_own = time.process_time() - own0
        _log(f"   {fill_s:.1f} s; {s.watchers} watchers ...")
        watchers.start()
        deadline = time.monotonic() + 120
        while min(watchers.answered) == 0 or await _held(admins) < s.watchers:
            if time.monotonic() > deadline:
                raise RuntimeError("the watchers were not all held within 120 s")
            await asyncio.sleep(0.2)
        _log(f"   measured phase: {s.changes} registrations at {s.rate:g}/s ...")
        rng = random.Random(s.seed + 1)
        watched = sorted(set(watchers.targets))
        times: list[float] = []
        answers: list[float] = []
        failures: Counter[str] = Counter()

        async def register_one(k: int) -> None:
            from meshlib.control.client import RegistryError

            service = rng.choice(watched)
            address, port = _address(s.instances + k)
            id = instance_id(NS, service, address, port)
            p = Pending(id, watchers.of(service), time.perf_counter())
            watchers.pending.setdefault(service, {})[id] = p
            try:
                await admins[k % len(admins)].register(NS, service, address, port, ttl=s.ttl)
            except RegistryError as exc:
                failures[_reason(exc)] += 1
                watchers.pending[service].pop(id, None)
                return
            answers.append((time.perf_counter() - p.sent) * 1000)
            try:
                await asyncio.wait_for(p.done.wait(), 30)
            except TimeoutError:
                failures["not seen in 30 s"] += 1
                return
            finally:
                watchers.pending[service].pop(id, None)
            times.append((p.done_at - p.sent) * 1000)

        etcd1 = registries.etcd_cpu_seconds()
        cpu1, own1, rev1, beats1 = (
            registries.cpu_seconds(),
            time.process_time(),
            registries.store_revision(),
            fleet.beats,
        )
        started = time.perf_counter()
        tasks = []
        for k in range(s.changes):
            delay = started + k / s.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(register_one(k)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
        cpu2, own2, rev2 = (
            registries.cpu_seconds(),
            time.process_time(),
            registries.store_revision(),
        )
        beats = fleet.beats - beats1
        etcd2 = registries.etcd_cpu_seconds()
        memory = registries.memory_mb()
        size = registries.store_size()
    finally:
        await watchers.stop()
        await fleet.stop()
        for admin in admins:
            await admin.aclose()
    seen = len(times)
    if not times:  # every registration failed: the table says why instead of a traceback
        _log(f"   no registration was seen by its watchers: {dict(failures)}")
        times = answers = [math.nan]
    return {
        "instances": s.instances,
        "services": s.services,
        "watchers": s.watchers,
        "watchers_per_service": s.watchers / len(set(watchers.targets)),
        "fill_s": fill_s,
        "fill_registry_cpu_s": fill_cpu,
        "fill_load_cpu_s": fill_own,
        "changes": seen,
        "failed": dict(failures),
        "p50_ms": statistics.median(times),
        "p99_ms": percentile(times, 0.99),
        "max_ms": max(times),
        "register_answer_p50_ms": statistics.median(answers),
        "window_s": wall,
        "registry_cpu_percent": [(b - a) / wall * 100 for a, b in zip(cpu1, cpu2, strict=True)],
        "etcd_cpu_percent": [(b - a) / wall * 100 for a, b in zip(etcd1, etcd2, strict=True)],
        "registry_memory": memory,
        "store_writes_per_s": (rev2 - rev1) / wall,
        "store": size,
        "bytes_per_instance": size["instance_bytes"] / max(size["instances"], 1),
        "db_bytes_per_instance": size["db_bytes"] / max(size["instances"], 1),
        "beats_per_s": beats / wall,
        "beat_errors": dict(fleet.errors),
        "reregistered": fleet.reregistered,
        "watch_errors": dict(watchers.errors),
        "backwards": watchers.backwards,
        "load_cpu_percent": (own2 - own1) / wall * 100,
    }


# -- B: the restart storm ----------------------------------------------------------------------


class Storm:
    """``clients`` fresh clients started at once against just-restarted registries."""

    def __init__(self, registries: Registries, s: Settings, jitter: bool) -> None:
        from meshlib.control.client import AsyncRegistryClient
        from meshlib.control.discovery import Pacing

        urls = registries.urls
        self.clients = [
            AsyncRegistryClient(urls[c % len(urls)], svid_dir=registries.admin_svid, timeout=30)
            for c in range(s.clients)
        ]
        self.registering = [asyncio.Semaphore(STORM_REGISTERS_IN_FLIGHT) for _ in self.clients]
        self.s = s
        self.pacing = Pacing() if jitter else Pacing(first_jitter=0.0)
        self.rng = random.Random(s.seed + (2 if jitter else 3))
        self.statuses: Counter[str] = Counter()
        self.watched = 0
        self.registered = 0
        self.started = 0.0
        self.watched_at = 0.0
        self.registered_at = 0.0
        self.steady = asyncio.Event()

    def _count(self, exc: Exception) -> float | None:
        from meshlib.control.client import RegistryError

        status = exc.status if isinstance(exc, RegistryError) else -1
        self.statuses["connection" if status == 0 else str(status)] += 1
        return getattr(exc, "retry_after", None)

    def _check_steady(self) -> None:
        if self.watched == self.s.watchers and self.registered == self.s.instances:
            self.steady.set()

    async def _register(self, c: int, n: int) -> None:
        from meshlib.control.registrar import (
            Failed,
            RegistrarSettings,
            Schedule,
            plan,
        )

        settings, schedule = RegistrarSettings(), Schedule()
        rng = random.Random(self.rng.random())
        address, port = _address(n)
        while True:
            try:
                async with self.registering[c]:
                    answer = await self.clients[c].register(
                        NS, _service(n, self.s.services), address, port, ttl=self.s.ttl
                    )
            except Exception as exc:
                retry_after = self._count(exc)
                schedule, delay = plan(schedule, Failed(retry_after), rng, settings)
                await asyncio.sleep(delay)
                continue
            del answer  # accepted: the registrar would now beat every heartbeat_interval
            self.registered += 1
            if self.registered == self.s.instances:
                self.registered_at = time.perf_counter()
            self._check_steady()
            return

    async def _watch(self, c: int, w: int) -> None:
        from meshlib.control.discovery import WatchRules

        rules = WatchRules(time.monotonic, random.Random(self.rng.random()), pacing=self.pacing)
        service = _service(w, self.s.services)
        await asyncio.sleep(rules.first_delay())
        first = True
        while True:
            await asyncio.sleep(rules.take_token())
            try:
                answer = await self.clients[c].endpoints(
                    NS,
                    service,
                    index=rules.index,
                    wait=0.0 if rules.failures else WAIT,
                    epoch=rules.epoch,
                )
            except Exception as exc:
                await asyncio.sleep(rules.failed(self._count(exc)))
                continue
            rules.answered(answer.index, answer.epoch)
            if first:
                first = False
                self.watched += 1
                if self.watched == self.s.watchers:
                    self.watched_at = time.perf_counter()
                self._check_steady()

    async def run(self, registries: Registries) -> dict[str, Any]:
        s = self.s
        tasks = []
        self.started = time.perf_counter()
        for c in range(s.clients):
            tasks += [
                asyncio.create_task(self._register(c, n)) for n in range(c, s.instances, s.clients)
            ]
            tasks += [
                asyncio.create_task(self._watch(c, w)) for w in range(c, s.watchers, s.clients)
            ]
        sampler = Sampler(registries, self.started)
        sampler.start()
        own = time.process_time()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.steady.wait(), 120)
            wall = time.perf_counter() - self.started
            own_cpu = time.process_time() - own
        finally:
            sampler.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in self.clients:
                await client.aclose()
        samples = sampler.samples
        peak_cpu = [
            max([x["cpu"][i] for x in samples], default=0.0)
            for i in range(len(registries.processes))
        ]
        peak_held = max([x["held"] for x in samples], default=0)
        failures = sum(n for k, n in self.statuses.items() if k == "connection" or k[0] == "5")
        return {
            "clients": s.clients,
            "jitter": self.pacing.first_jitter,
            "steady": self.steady.is_set(),
            "steady_s": wall if self.steady.is_set() else None,
            "watched_s": (self.watched_at - self.started) if self.watched_at else None,
            "registered_s": (self.registered_at - self.started) if self.registered_at else None,
            "watched": self.watched,
            "registered": self.registered,
            "peak_registry_cpu_percent": peak_cpu,
            "peak_held": peak_held,
            "statuses": dict(self.statuses),
            "status_429": self.statuses.get("429", 0),
            "failures_5xx_or_connection": failures,
            "load_cpu_percent": own_cpu / wall * 100,
            "samples": samples,
        }


async def storms(registries: Registries, s: Settings) -> list[dict[str, Any]]:
    found = []
    for jitter in (True, False):
        _log(f"B. restart storm, {'with' if jitter else 'without'} first-request jitter ...")
        await asyncio.to_thread(registries.restart)
        found.append(await Storm(registries, s, jitter).run(registries))
    return found


class Sampler(threading.Thread):
    """Every 0.25 s, each registry process's CPU and the queries it holds, from a thread of
    its own: the storm keeps the event loop too busy to sample on time."""

    def __init__(self, registries: Registries, started: float) -> None:
        super().__init__(name="storm-sampler", daemon=True)
        self.registries, self.started = registries, started
        self.samples: list[dict[str, Any]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        from meshlib.control.client import RegistryClient, RegistryError

        admins = [
            RegistryClient(url, svid_dir=self.registries.admin_svid, timeout=2.0)
            for url in self.registries.urls
        ]
        try:
            cpu, at = self.registries.cpu_seconds(), time.perf_counter()
            while not self.stopping.wait(0.25):
                now_cpu, now = self.registries.cpu_seconds(), time.perf_counter()
                use = [(b - a) / (now - at) * 100 for a, b in zip(cpu, now_cpu, strict=True)]
                cpu, at = now_cpu, now
                held = -1
                with contextlib.suppress(RegistryError):
                    held = sum(admin.status().watchers for admin in admins)
                self.samples.append({"t": now - self.started, "cpu": use, "held": held})
        finally:
            for admin in admins:
                admin.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


# -- report --------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(results: dict[str, Any], command: str) -> str:
    m, st = results["machine"], results["settings"]
    shape = (
        "SQLite, 1 registry"
        if st["store"] == "sqlite"
        else (f"etcd ({st['etcd_nodes']} nodes), {st['replicas']} registry replicas")
    )
    lines = [
        f"`{command}` — {shape}; registry pinned to CPU {m['registry_cpu']} (all replicas and "
        f"etcd share it), load generator on CPU {m['load_cpus']}; {m['summary']}; machine shared "
        f"with other jobs: load average {m['load_average'][0]:.1f} before, "
        f"{m['load_average'][1]:.1f} after (this run included)",
        "",
        "| figure | value | target |",
        "|---|--:|---|",
    ]
    a = results["propagation"]
    ok = a["p99_ms"] <= TARGET_PROPAGATION_P99_MS
    cpus = " + ".join(f"{c:.0f}" for c in a["registry_cpu_percent"])
    rss = " + ".join(f"{x['rss_mb']:.0f}" for x in a["registry_memory"])
    lines += [
        f"| A. fill: {a['instances']} instances registered over {a['services']} services (s) "
        f"| {a['fill_s']:.1f} | |",
        f"| propagation of a register to every watcher of its service, p50 / p99 / max (ms; "
        f"{a['changes']} registrations at {st['rate']:g}/s, {a['watchers']} watchers, "
        f"{a['watchers_per_service']:.0f} per service) | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} / "
        f"{a['max_ms']:.1f} | p99 <= {TARGET_PROPAGATION_P99_MS:.0f} ms: {_verdict(ok)} |",
        f"| ... the register's own answer, p50 (ms) | {a['register_answer_p50_ms']:.1f} | |",
        f"| ... registrations failed (by reason) / watch errors | "
        f"{a['failed'] or 0} / {a['watch_errors'] or 0} | |",
        f"| registry CPU while measuring (% of one core, per process) | {cpus} | |",
        f"| registry RSS (MB, per process) | {rss} | |",
        f"| etcd CPU while measuring (% of one core, per node) | "
        f"{' + '.join(f'{c:.0f}' for c in a['etcd_cpu_percent']) or '-'} | |",
        f"| heartbeats/s delivered (TTL {st['ttl']:g} s; errors, re-registered) | "
        f"{a['beats_per_s']:.0f} ({sum(a['beat_errors'].values())}, {a['reregistered']}) | |",
        f"| store writes/s (revision delta) | {a['store_writes_per_s']:.0f} | |",
        f"| store size (MB) / per instance (bytes on disk; the instance record) | "
        f"{a['store']['db_bytes'] / 1e6:.1f} / {a['db_bytes_per_instance']:.0f}; "
        f"{a['bytes_per_instance']:.0f} | |",
        f"| load generator's CPU while measuring (% of one core) / peak RSS (MB) | "
        f"{a['load_cpu_percent']:.0f} / {results['load_peak_rss_mb']:.0f} | |",
    ]
    for b in results["storms"]:
        label = "with" if b["jitter"] else "without"
        settled = b["steady_s"] is not None and b["steady_s"] <= TARGET_STORM_S
        clean = b["failures_5xx_or_connection"] == 0
        steady = (
            f"{b['steady_s']:.1f}"
            if b["steady_s"] is not None
            else (f"not steady in 120 s ({b['watched']} watched, {b['registered']} registered)")
        )
        lines += [
            f"| B. restart storm, {b['clients']} clients at once, {label} first-request jitter: "
            f"steady state (s; all watchers answered / all registered) | {steady} "
            f"({b['watched_s'] or 0:.1f} / {b['registered_s'] or 0:.1f}) | <= "
            f"{TARGET_STORM_S:.0f} s: {_verdict(settled)} |",
            f"| ... peak registry CPU (%) / peak held queries / 429s | "
            f"{' + '.join(f'{c:.0f}' for c in b['peak_registry_cpu_percent'])} / {b['peak_held']} "
            f"/ {b['status_429']} | |",
            f"| ... 5xx or connection errors seen by clients "
            f"(all non-2xx: {b['statuses'] or 'none'}) "
            f"| {b['failures_5xx_or_connection']} | 0: {_verdict(clean)} |",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: the smoke test")
    parser.add_argument("--store", choices=("sqlite", "etcd"), default="sqlite")
    parser.add_argument("--etcd-nodes", type=int, default=3, help="etcd cluster size (3)")
    parser.add_argument("--replicas", type=int, help="registry processes over etcd (2)")
    parser.add_argument("--instances", type=int, help="instances kept alive (10000)")
    parser.add_argument("--services", type=int, help="services they spread over (1000)")
    parser.add_argument("--watchers", type=int, help="long-polls spread over services (1000)")
    parser.add_argument("--clients", type=int, help="clients of the restart storm (1000)")
    parser.add_argument("--changes", type=int, help="registrations measured in A (200)")
    parser.add_argument("--rate", type=float, help="their rate per second (5)")
    parser.add_argument("--ttl", type=float, help="instance TTL, s; beats every TTL/3 (90)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--json", type=Path, help="default benchmarks/results/registry_scale-STORE.json"
    )
    args = parser.parse_args(argv)
    full = {
        "instances": 10_000,
        "services": 1_000,
        "watchers": 1_000,
        "clients": 1_000,
        "changes": 200,
        "rate": 5.0,
        "ttl": 90.0,
    }
    quick = {
        "instances": 200,
        "services": 20,
        "watchers": 40,
        "clients": 20,
        "changes": 10,
        "rate": 20.0,
        "ttl": 30.0,
    }
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.replicas is None:
        args.replicas = 2 if args.store == "etcd" else 1
    for name in (
        "instances",
        "services",
        "watchers",
        "clients",
        "changes",
        "etcd_nodes",
        "replicas",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate <= 0 or not 1 <= args.ttl <= 300:
        parser.error("--rate must be above zero and --ttl within 1..300 s")
    if args.store == "sqlite" and args.replicas != 1:
        parser.error("--replicas needs --store etcd (SQLite is one process per data dir)")
    settings = Settings(
        args.store,
        args.instances,
        args.services,
        args.watchers,
        args.clients,
        args.changes,
        args.rate,
        args.ttl,
        args.seed,
        args.etcd_nodes,
        args.replicas,
    )
    registry_cpu, load_cpus = split_cores()
    load_before = os.getloadavg()[0]
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, load_cpus)  # restored below: a test calling main() keeps its cores
    etcd: Etcd | None = None
    registries: Registries | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="meshlib-registry-scale-") as tmp:
            try:
                if args.store == "etcd":
                    _log(f"starting a {args.etcd_nodes}-node etcd cluster ...")
                    etcd = Etcd.start(Path(tmp) / "etcd", args.etcd_nodes)
                    for process in etcd.processes:  # etcd shares the registry's core
                        os.sched_setaffinity(process.pid, registry_cpu)
                registries = Registries(
                    Path(tmp) / "data", args.store, registry_cpu, etcd, args.replicas
                )
                registries.init()
                registries.start()

                async def run() -> dict[str, Any]:
                    assert registries is not None
                    return {
                        "propagation": await propagation(registries, settings),
                        "storms": await storms(registries, settings),
                    }

                results = asyncio.run(run())
            finally:
                if registries is not None:
                    registries.stop()
                if etcd is not None:
                    etcd.stop()
    finally:
        os.sched_setaffinity(0, previous)
    results["load_peak_rss_mb"] = _own_memory_mb()
    results["machine"] = machine_info(registry_cpu, load_cpus)
    results["machine"]["load_average"] = [load_before, os.getloadavg()[0]]
    results["settings"] = vars(settings)
    shown = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python benchmarks/registry_scale.py", *shown])
    results["command"] = command
    print(report(results, command))
    out = args.json or REPO_ROOT / "benchmarks" / "results" / f"registry_scale-{args.store}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    _log(f"wrote {out}")
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: every process is stopped on the way


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    raise SystemExit(main())
