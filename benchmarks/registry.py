"""The registry's numbers: registrations per second, propagation to 200 watchers, which
watchers one change wakes, and the CPU of 1,000 instances heartbeating.

    python benchmarks/registry.py [--quick] [--json out.json]

The registry is a real process, ``meshctl registry serve`` on a fresh ``meshctl registry init``
data dir (SQLite), pinned to one core; the load comes from this process (pinned to the other
cores) through :class:`meshlib.control.client.AsyncRegistryClient`, mutual TLS included, as the
admin identity (which may write any instance). Four measurements, one after another:

a. **registrations/s**: ``--clients`` concurrent clients register ``--registrations`` distinct
   instances (then deregister them, also timed); the registry's CPU per registration from
   ``/proc/PID/stat``.
b. **propagation**: ``--watchers`` long-polls on one service's endpoints (then on the policy);
   the time from sending a register (then a ``PUT /v1/policy`` with a new policy text, as
   ``meshctl apply`` does) to the moment EVERY watcher holds an answer with the new index,
   ``--repetitions`` times, p50/p99. All watchers run in this process, on one core: a watcher
   sends its next long-poll only once every watcher has its answer, so that re-polls do not
   compete with the answers still arriving, which 200 processes with a CPU each would not
   (the load generator's CPU during the fan-out is reported: near 100 % means the figure is
   this process's, not the registry's). Before each change all watchers are held again (the
   registry's ``/v1/status`` ``watchers`` is back to ``--watchers``), so each repetition measures
   the wake-up path, not an immediate answer.
c. **who wakes**: ``--watchers`` long-polls spread over ``--services`` services; one register in
   one service; the answers every watcher got are counted client-side after the woken ones
   answered plus a settle time. The contrast, a Consul-style single global index, is computed
   from the same run, not served: with one index every held query's index is the global one,
   so a change answers every query held at that moment (``/v1/status`` ``watchers`` just
   before the change).
d. **heartbeat CPU**: ``--instances`` instances registered, each beating every
   ``--interval`` s with +-10 % jitter; after one interval of warm-up, the registry process's
   CPU seconds per wall second over ``--window`` s (every thread, from the process's CPU-time
   clock: :func:`cpu_seconds`), and then, as the floor, the same registry with the same
   instances and nothing beating over ``--idle`` s.
   An instance whose heartbeat gets a 404 registers again at once, as the real client does.

Markdown goes to stdout, progress to stderr. Every process it starts is stopped on the way out.
Importing this module has no side effects; everything happens in :func:`main`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
NS = "bench"
#: Watchers per client: each held query needs a connection, and httpx's pool keeps only 20 alive
#: (``max_keepalive_connections``). With 50, the 30 connections past it were closed as their
#: answers came back and each re-poll paid a new mutual-TLS handshake (and SVID check) on the
#: registry — about 130 per change, most of the registry's CPU in the propagation phase. A real
#: watcher is its own process and keeps its one connection.
WATCHERS_PER_CLIENT = 20
#: Long enough that no held query ends by its wait inside a measurement.
WAIT = 120.0
TARGET_PROPAGATION_P99_MS = 250.0
TARGET_HEARTBEAT_CPU_PERCENT = 5.0

POLICY = """apiVersion: meshlib/v1
kind: Mesh
metadata: {{name: mesh}}
spec: {{trustDomain: {td}}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews, namespace: default}}
spec:
  endpoints: [{{address: "127.0.0.1:{port}"}}]
"""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank: p99 of 50 values is the largest but none."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# -- the registry process -------------------------------------------------------------------------


@dataclass
class RegistryProcess:
    """``meshctl registry serve`` running on ``data``; read its CPU from /proc."""

    process: subprocess.Popen[bytes]
    data: Path
    url: str
    trust_domain: str

    @property
    def admin_svid(self) -> str:
        return str(self.data / "admin")

    def cpu_seconds(self) -> float:
        """CPU seconds of every thread of the registry process so far (:func:`cpu_seconds`)."""
        return cpu_seconds(self.process.pid)


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, every thread, exited ones too) of process ``pid`` so far.

    Read from the process's CPU-time clock (``clock_getcpuclockid``), which counts in
    nanoseconds. /proc/PID/stat's utime + stime, the fallback where that clock cannot be had,
    counts in clock ticks (10 ms): over the quick run's 0.2 s idle window one tick is 5 % of a
    core, enough to make "idle removed" come out below zero.
    """
    clock = _cpu_clock(pid)
    if clock is not None:
        with contextlib.suppress(OSError):
            return time.clock_gettime(clock)
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (``find_library`` runs ``ldconfig``: ≈ 1.6 ms a time,
    too slow to sit between the readings that bound a window)."""
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name, use_errno=True)


def _cpu_clock(pid: int) -> int | None:
    """The clock id of ``pid``'s CPU-time clock, or None where libc does not give one."""
    libc = _libc()
    if libc is None:
        return None
    clock = ctypes.c_int()
    if libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        return None
    return clock.value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def split_cores() -> tuple[set[int], set[int]]:
    """(the registry's core, the load generator's cores): split when there are two or more
    (benchmarks/signing.py, registry_scale.py and gateway.py split with it too)."""
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        return set(mine), set(mine)
    return {mine[0]}, set(mine[1:])


@contextlib.contextmanager
def registry_process(
    data: Path, core: set[int], store: str = "sqlite", profile: Path | None = None
) -> Iterator[RegistryProcess]:
    """Init ``data``, serve it on a free port pinned to ``core``; stop it (SIGTERM) on exit.
    With ``profile``, each of the registry's threads runs under cProfile and writes its stats to
    ``profile.<thread name>`` as it ends (``benchmarks/profiled.py``)."""
    cli = [sys.executable, "-m", "meshlib.cli", "registry"]
    serve = cli
    if profile is not None:  # every thread profiled: the server's is not the main one
        profiled = Path(__file__).with_name("profiled.py")
        serve = [sys.executable, str(profiled), str(profile), *cli[1:]]
    init = subprocess.run(
        [*cli, "init", "--data", str(data), "--trust-domain", "bench.test"],
        capture_output=True,
        text=True,
        check=False,
    )
    if init.returncode != 0:
        raise RuntimeError(f"meshctl registry init failed: {init.stderr.strip()}")
    url = f"https://127.0.0.1:{_free_port()}"
    process = subprocess.Popen(
        [
            *serve,
            "serve",
            "--data",
            str(data),
            "--store",
            store,
            "--listen",
            url[len("https://") :],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # Popen returns once the child has exec'd Python, before it starts a thread: every
        # thread it starts later inherits the mask
        os.sched_setaffinity(process.pid, core)
        running = RegistryProcess(process, data, url, "bench.test")
        _wait_ready(running)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def _wait_ready(running: RegistryProcess, timeout: float = 30.0) -> None:
    from meshlib.control.client import RegistryClient, RegistryError

    deadline = time.monotonic() + timeout
    with RegistryClient(running.url, svid_dir=running.admin_svid, timeout=2.0) as client:
        while True:
            if running.process.poll() is not None:
                err = running.process.stderr.read().decode() if running.process.stderr else ""
                raise RuntimeError(f"the registry exited at start: {err.strip()}")
            try:
                client.status()
                return
            except RegistryError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the registry at {running.url} did not answer") from None
                time.sleep(0.05)


# -- load ------------------------------------------------------------------------------------------


@dataclass
class Settings:
    clients: int
    registrations: int
    watchers: int
    repetitions: int
    services: int
    wake_repetitions: int
    instances: int
    interval: float
    window: float
    idle: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(
            args.clients,
            args.registrations,
            args.watchers,
            args.repetitions,
            args.services,
            args.wake_repetitions,
            args.instances,
            args.interval,
            args.window,
            args.idle,
        )


def _address(n: int) -> tuple[str, int]:
    """A distinct (address, port) for instance number ``n``."""
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}", 8000 + n // 16_777_216


class Clients:
    """Enough :class:`AsyncRegistryClient` s for ``count`` concurrent requests, round robin."""

    def __init__(self, running: RegistryProcess, count: int) -> None:
        from meshlib.control.client import AsyncRegistryClient

        n = max(1, math.ceil(count / WATCHERS_PER_CLIENT))
        self.all = [
            AsyncRegistryClient(running.url, svid_dir=running.admin_svid, timeout=30.0)
            for _ in range(n)
        ]

    def __getitem__(self, i: int) -> Any:
        return self.all[i % len(self.all)]

    async def aclose(self) -> None:
        for client in self.all:
            await client.aclose()


async def _until_held(admin: Any, count: int, timeout: float = 30.0) -> int:
    """Wait until the registry holds ``count`` blocking queries; return the count."""
    deadline = time.monotonic() + timeout
    while True:
        held = (await admin.status()).watchers
        if held >= count:
            return held
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {held} of {count} blocking queries held after {timeout} s")
        await asyncio.sleep(0.005)


async def registrations(running: RegistryProcess, s: Settings) -> dict[str, Any]:
    clients = Clients(running, s.clients)
    numbers = iter(range(s.registrations))
    registered: list[tuple[str, str]] = []

    async def register_some(worker: int) -> None:
        for n in numbers:
            address, port = _address(n)
            service = f"reg{n % 20}"
            done = await clients[worker].register(NS, service, address, port, ttl=300)
            registered.append((service, done.id))

    async def deregister_some(worker: int, batch: list[tuple[str, str]]) -> None:
        for service, id in batch:
            await clients[worker].deregister(NS, service, id)

    try:
        cpu, started = running.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(register_some(w) for w in range(s.clients)))
        wall, cpu = time.perf_counter() - started, running.cpu_seconds() - cpu
        batches = [registered[w :: s.clients] for w in range(s.clients)]
        started = time.perf_counter()
        await asyncio.gather(*(deregister_some(w, b) for w, b in enumerate(batches)))
        drain_wall = time.perf_counter() - started
    finally:
        await clients.aclose()
    return {
        "registrations": len(registered),
        "clients": s.clients,
        "per_second": len(registered) / wall,
        "registry_cpu_ms_per_registration": cpu / len(registered) * 1000,
        "deregistrations_per_second": len(registered) / drain_wall,
    }


@dataclass
class Round:
    """One change: answers with an index above ``above`` count; ``done`` when all have one."""

    above: int
    remaining: int
    started: float
    last: float = 0.0
    first: float = math.inf
    #: This process's CPU time when the last answer arrived.
    cpu_at_last: float = 0.0
    #: The watchers that count (None: all of them).
    members: frozenset[int] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Watchers:
    """``count`` long-polls on ``targets`` (a watcher's target: (service) or None, the policy);
    each counts its answers and checks in with the current :class:`Round`."""

    def __init__(self, running: RegistryProcess, targets: list[str | None]) -> None:
        self.clients = Clients(running, len(targets))
        self.targets = targets
        self.answers = [0] * len(targets)
        self.round: Round | None = None
        self.stopping = False
        self.tasks: list[asyncio.Task[None]] = []
        self.backwards = 0

    async def _get(self, i: int, index: int) -> int:
        target, client = self.targets[i], self.clients[i]
        if target is None:
            return int((await client.policy(index=index, wait=WAIT)).version)
        return int((await client.endpoints(NS, target, index=index, wait=WAIT)).index)

    async def _watch(self, i: int) -> None:
        index = await self._get(i, 0)
        while not self.stopping:
            got = await self._get(i, index)
            now = time.perf_counter()
            self.answers[i] += 1
            if got < index:
                self.backwards += 1
            index = got
            r = self.round
            if (
                r is not None
                and (r.members is None or i in r.members)
                and got > r.above
                and now >= r.started
            ):
                r.remaining -= 1
                r.last = max(r.last, now)
                r.first = min(r.first, now)
                if r.remaining == 0:
                    r.cpu_at_last = time.process_time()
                    r.done.set()
                # the next long-poll waits for the round's end: 200 real watchers have a CPU
                # each, so their re-polls would not compete with the answers still arriving
                await r.done.wait()

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._watch(i)) for i in range(len(self.targets))]

    async def stop(self, change_all: Any) -> None:
        """Let every watcher answer once more (``change_all()`` changes what they watch) and end."""
        self.stopping = True
        await change_all()
        _, pending = await asyncio.wait(self.tasks, timeout=30)
        for task in pending:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                exc = task.exception() if task.done() and not task.cancelled() else None
                if exc is not None:
                    raise exc
        await self.clients.aclose()


async def propagation(
    running: RegistryProcess, s: Settings, admin: Any, counter: Iterator[int]
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    service = "prop"
    address, port = _address(next(counter))
    await admin.register(NS, service, address, port, ttl=300)

    async def register_one() -> None:
        address, port = _address(next(counter))
        await admin.register(NS, service, address, port, ttl=300)

    versions = iter(range(1, 1_000_000))

    async def apply_one() -> None:
        text = POLICY.format(td=running.trust_domain, port=9000 + next(versions))
        await admin.apply(text, source="bench.yaml")

    for kind, targets, change in (
        ("register", [service] * s.watchers, register_one),
        ("apply", [None] * s.watchers, apply_one),
    ):
        if kind == "apply":
            await apply_one()  # version 1 exists before the watchers read it
        watchers = Watchers(running, targets)
        watchers.start()
        times: list[float] = []
        firsts: list[float] = []
        registry_cpu = load_cpu = wall = 0.0
        try:
            for _ in range(s.repetitions):
                await _until_held(admin, s.watchers)
                before = (
                    (await admin.policy()).version
                    if kind == "apply"
                    else (await admin.endpoints(NS, service)).index
                )
                cpu, own = running.cpu_seconds(), time.process_time()
                watchers.round = r = Round(before, s.watchers, time.perf_counter())
                await change()
                await asyncio.wait_for(r.done.wait(), 30)
                times.append((r.last - r.started) * 1000)
                firsts.append((r.first - r.started) * 1000)
                registry_cpu += running.cpu_seconds() - cpu
                load_cpu += r.cpu_at_last - own
                wall += r.last - r.started
        finally:
            await watchers.stop(change)
        results[kind] = {
            "watchers": s.watchers,
            "repetitions": len(times),
            "p50_ms": statistics.median(times),
            "p99_ms": percentile(times, 0.99),
            "max_ms": max(times),
            "first_p50_ms": statistics.median(firsts),
            "registry_cpu_ms_per_change": registry_cpu / len(times) * 1000,
            "load_cpu_util": load_cpu / wall,
            "backwards": watchers.backwards,
        }
    return results


async def wakeups(
    running: RegistryProcess, s: Settings, admin: Any, counter: Iterator[int]
) -> dict[str, Any]:
    services = [f"wake{i}" for i in range(s.services)]
    for service in services:
        address, port = _address(next(counter))
        await admin.register(NS, service, address, port, ttl=300)
    targets = [services[i % len(services)] for i in range(s.watchers)]
    watchers = Watchers(running, targets)
    watchers.start()
    answered: list[int] = []
    held_before: list[int] = []
    own: list[int] = []
    try:
        for rep in range(s.wake_repetitions):
            held_before.append(await _until_held(admin, s.watchers))
            service = services[rep % len(services)]
            mine = [i for i, t in enumerate(targets) if t == service]
            own.append(len(mine))
            before = list(watchers.answers)
            index = (await admin.endpoints(NS, service)).index
            watchers.round = r = Round(
                index, len(mine), time.perf_counter(), members=frozenset(mine)
            )
            address, port = _address(next(counter))
            await admin.register(NS, service, address, port, ttl=300)
            await asyncio.wait_for(r.done.wait(), 30)
            # any watcher of another service woken by mistake answers within this time too
            await asyncio.sleep(max(0.1, 4 * (r.last - r.started)))
            answered.append(sum(a - b for a, b in zip(watchers.answers, before, strict=True)))
    finally:

        async def change_all() -> None:
            for service in services:
                address, port = _address(next(counter))
                await admin.register(NS, service, address, port, ttl=300)

        await watchers.stop(change_all)
    return {
        "watchers": s.watchers,
        "services": s.services,
        "changes": len(answered),
        "own_watchers_per_change": statistics.mean(own),
        "answered_per_change": statistics.mean(answered),
        "answered_max": max(answered),
        "global_index_would_answer": statistics.mean(held_before),
    }


async def heartbeats(
    running: RegistryProcess, s: Settings, counter: Iterator[int]
) -> dict[str, Any]:
    from meshlib.control.client import RegistryNotFound

    clients = Clients(running, 4 * WATCHERS_PER_CLIENT)  # 4 clients, as before (a beat is short)
    rng = random.Random(11)
    numbers = [next(counter) for _ in range(s.instances)]
    instances: list[tuple[int, str, str]] = []

    async def register(n: int) -> str:
        address, port = _address(n)
        done = await clients[n].register(NS, f"hb{n % 50}", address, port, ttl=10)
        return str(done.id)

    async def register_some(batch: list[int]) -> None:
        for n in batch:
            instances.append((n, f"hb{n % 50}", await register(n)))

    beats = failures = reregistered = 0
    errors: dict[str, int] = {}
    stopping = asyncio.Event()

    async def beat(n: int, service: str, id: str) -> None:
        nonlocal beats, failures, reregistered
        delay = rng.uniform(0, s.interval)
        while not stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            if stopping.is_set():
                return
            try:
                await clients[n].heartbeat(NS, service, id)
                beats += 1
            except RegistryNotFound:  # expired: register again at once, as a client does
                reregistered += 1
                await register(n)
            except Exception as exc:  # counted and reported; the load goes on
                failures += 1
                errors[str(exc)[:120]] = errors.get(str(exc)[:120], 0) + 1
            delay = s.interval * rng.uniform(0.9, 1.1)

    try:
        # registered concurrently, then beating at once: none gets near its 10 s TTL unbeaten
        await asyncio.gather(*(register_some(numbers[w::16]) for w in range(16)))
        tasks = [asyncio.create_task(beat(n, svc, id)) for n, svc, id in instances]
        try:
            await asyncio.sleep(s.interval)  # warm-up: every instance has beaten once
            cpu, beats_before, started = running.cpu_seconds(), beats, time.perf_counter()
            await asyncio.sleep(s.window)
            wall = time.perf_counter() - started
            cpu = running.cpu_seconds() - cpu
            rate = (beats - beats_before) / wall
        finally:
            stopping.set()
            await asyncio.gather(*tasks)
        # the floor: the same 1,000 instances registered, nothing beating (idle < TTL - interval)
        idle_cpu, idle_started = running.cpu_seconds(), time.perf_counter()
        await asyncio.sleep(s.idle)
        idle = (running.cpu_seconds() - idle_cpu) / (time.perf_counter() - idle_started)
    finally:
        await clients.aclose()
    return {
        "instances": s.instances,
        "interval_s": s.interval,
        "window_s": wall,
        "beats_per_second": rate,
        "failures": failures,
        "errors": errors,
        "reregistered": reregistered,
        "cpu_percent": cpu / wall * 100,
        "idle_cpu_percent": idle * 100,
        "registry_cpu_ms_per_beat": (cpu / wall - idle) / rate * 1000 if rate else math.nan,
    }


PARTS = ("registrations", "propagation", "wakeups", "heartbeats")


async def run_all(
    running: RegistryProcess, s: Settings, parts: Sequence[str] = PARTS
) -> dict[str, Any]:
    from meshlib.control.client import AsyncRegistryClient

    counter = iter(range(10_000_000, 20_000_000))
    results: dict[str, Any] = {}
    if "registrations" in parts:
        _log("a. registrations ...")
        results["registrations"] = await registrations(running, s)
    async with AsyncRegistryClient(running.url, svid_dir=running.admin_svid, timeout=30) as admin:
        if "propagation" in parts:
            _log("b. propagation ...")
            results["propagation"] = await propagation(running, s, admin, counter)
        if "wakeups" in parts:
            _log("c. wake-ups ...")
            results["wakeups"] = await wakeups(running, s, admin, counter)
    if "heartbeats" in parts:
        _log("d. heartbeat CPU ...")
        results["heartbeats"] = await heartbeats(running, s, counter)
    return results


# -- report ----------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(results: dict[str, Any], command: str) -> str:
    """The run as a Markdown table; only the parts that ran (``--only``)."""
    lines = [
        f"`{command}` — registry pinned to CPU {results['machine']['registry_cpu']}, "
        f"load on CPU {results['machine']['load_cpus']}; {results['settings']['store']} store; "
        f"{results['machine']['summary']}; load average "
        f"{results['machine']['load_average'][0]:.1f} before, "
        f"{results['machine']['load_average'][1]:.1f} after (this run included)",
        "",
        "| figure | value | target |",
        "|---|--:|---|",
    ]
    ratios = []
    if "registrations" in results:
        reg = results["registrations"]
        lines += [
            f"| registrations/s ({reg['clients']} clients, {reg['registrations']} instances) "
            f"| {reg['per_second']:.0f} | |",
            f"| registry CPU per registration (ms) | "
            f"{reg['registry_cpu_ms_per_registration']:.2f} | |",
            f"| deregistrations/s | {reg['deregistrations_per_second']:.0f} | |",
        ]
    if "propagation" in results:
        prop = results["propagation"]
        for kind, label in (("register", "a register"), ("apply", "PUT /v1/policy")):
            p = prop[kind]
            ok = p["p99_ms"] <= TARGET_PROPAGATION_P99_MS
            lines += [
                f"| propagation of {label} to all {p['watchers']} watchers, p50 / p99 / max (ms, "
                f"{p['repetitions']} reps) | {p['p50_ms']:.1f} / {p['p99_ms']:.1f} / "
                f"{p['max_ms']:.1f} | p99 <= {TARGET_PROPAGATION_P99_MS:.0f} ms: {_verdict(ok)} |",
                f"| ... first watcher's answer, p50 (ms) / registry CPU per change (ms) / load "
                f"generator's CPU while fanning out (% of its core) | {p['first_p50_ms']:.1f} / "
                f"{p['registry_cpu_ms_per_change']:.0f} / {p['load_cpu_util'] * 100:.0f} | |",
            ]
        ratios.append(
            f"propagation p99 of a register is "
            f"{prop['register']['p99_ms'] / TARGET_PROPAGATION_P99_MS:.2f}x its target, "
            f"of an apply {prop['apply']['p99_ms'] / TARGET_PROPAGATION_P99_MS:.2f}x; "
            "watch answers that went backwards in index: "
            f"{prop['register']['backwards'] + prop['apply']['backwards']}"
        )
    if "wakeups" in results:
        wake = results["wakeups"]
        only = wake["answered_max"] <= wake["own_watchers_per_change"]
        lines += [
            f"| watchers answered per change ({wake['watchers']} over {wake['services']} "
            f"services, {wake['changes']} changes; max) | {wake['answered_per_change']:.1f} "
            f"({wake['answered_max']}) | only that service's "
            f"{wake['own_watchers_per_change']:.0f}: {_verdict(only)} |",
            f"| ... with one global index (Consul-style, computed: queries held at the change) "
            f"| {wake['global_index_would_answer']:.0f} | |",
        ]
        ratios.insert(  # first, as the ratio the benchmark was made for
            0,
            "one global index answers "
            f"{wake['global_index_would_answer'] / max(wake['answered_per_change'], 1e-9):.0f}x "
            "the queries the per-service index answers for one change",
        )
    if "heartbeats" in results:
        hb = results["heartbeats"]
        # a load generator starved by other processes beats less often: then no verdict
        intended = hb["instances"] / hb["interval_s"]
        beats_verdict = (
            _verdict(hb["cpu_percent"] <= TARGET_HEARTBEAT_CPU_PERCENT)
            if hb["beats_per_second"] >= 0.9 * intended
            else f"not judged: {hb['beats_per_second']:.0f} of {intended:.0f} beats/s delivered"
        )
        lines += [
            f"| registry CPU, {hb['instances']} instances beating every {hb['interval_s']:g} s "
            f"(% of one core, {hb['window_s']:.1f} s) | {hb['cpu_percent']:.2f} | <= "
            f"{TARGET_HEARTBEAT_CPU_PERCENT:.0f} %: {beats_verdict} |",
            f"| ... of which idle (nothing beating) | {hb['idle_cpu_percent']:.2f} | |",
            f"| heartbeats/s delivered (failed, re-registered after a 404) "
            f"| {hb['beats_per_second']:.0f} ({hb['failures']}, {hb['reregistered']}) | |",
            f"| registry CPU per heartbeat (ms, idle removed) | "
            f"{hb['registry_cpu_ms_per_beat']:.3f} | |",
        ]
        ratios.append(
            f"heartbeat CPU is {hb['cpu_percent'] / TARGET_HEARTBEAT_CPU_PERCENT:.2f}x its target"
        )
    if ratios:
        lines += ["", "Ratios: " + "; ".join(ratios) + "."]
    return "\n".join(lines)


def machine_info(registry_cpu: set[int], load_cpus: set[int]) -> dict[str, Any]:
    """The cores each side ran on, the CPU model and Python (benchmarks/signing.py uses it too)."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "registry_cpu": ",".join(map(str, sorted(registry_cpu))),
        "load_cpus": ",".join(map(str, sorted(load_cpus))),
        "cpu_count": os.cpu_count(),
        "model": model,
        "python": platform.python_version(),
        "summary": f"{os.cpu_count()} vCPU {model}, Python {platform.python_version()}",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: the smoke test")
    parser.add_argument("--clients", type=int, help="concurrent registering clients (16)")
    parser.add_argument("--registrations", type=int, help="instances registered in a. (2000)")
    parser.add_argument("--watchers", type=int, help="long-polls in b. and c. (200)")
    parser.add_argument("--repetitions", type=int, help="changes measured in b., each (100)")
    parser.add_argument("--services", type=int, help="services the watchers of c. spread over")
    parser.add_argument("--wake-repetitions", type=int, help="changes in c. (20)")
    parser.add_argument("--instances", type=int, help="heartbeating instances in d. (1000)")
    parser.add_argument("--interval", type=float, default=3.0, help="heartbeat interval (3 s)")
    parser.add_argument("--window", type=float, help="CPU window of d., seconds (30)")
    parser.add_argument("--idle", type=float, help="idle CPU window of d., seconds (5)")
    parser.add_argument(
        "--store",
        choices=("sqlite", "memory"),
        default="sqlite",
        help="the registry's store (sqlite, the default; memory shows what SQLite costs)",
    )
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument(
        "--only",
        action="append",
        choices=PARTS,
        help="run only this part (repeatable): e.g. --only heartbeats --only propagation",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="run the registry under cProfile and write its stats here (the CPU figures then "
        "include cProfile's own cost: read the profile for where the time goes, not the table)",
    )
    args = parser.parse_args(argv)
    full = {
        "clients": 16,
        "registrations": 2000,
        "watchers": 200,
        "repetitions": 100,
        "services": 100,
        "wake_repetitions": 20,
        "instances": 1000,
        "window": 30.0,
        "idle": 5.0,
    }
    quick = {
        "clients": 4,
        "registrations": 40,
        "watchers": 10,
        "repetitions": 3,
        "services": 5,
        "wake_repetitions": 2,
        "instances": 20,
        "window": 0.5,
        "idle": 0.2,
    }
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick and args.interval == 3.0:
        args.interval = 0.5
    for name in ("clients", "registrations", "watchers", "repetitions", "services"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.wake_repetitions < 1 or args.instances < 1:
        parser.error("--wake-repetitions and --instances must be at least 1")
    if args.interval <= 0 or args.window <= 0 or args.idle < 0:
        parser.error("--interval and --window must be above zero, --idle at least zero")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    settings = Settings.from_args(args)
    registry_cpu, load_cpus = split_cores()
    load_before = os.getloadavg()[0]
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, load_cpus)  # restored below: a test calling main() keeps its cores
    try:
        with (
            tempfile.TemporaryDirectory(prefix="meshlib-registry-bench-") as tmp,
            registry_process(Path(tmp) / "data", registry_cpu, args.store, args.profile) as running,
        ):
            results = asyncio.run(run_all(running, settings, args.only or PARTS))
    finally:
        os.sched_setaffinity(0, previous)
    results["machine"] = machine_info(registry_cpu, load_cpus)
    results["machine"]["load_average"] = [load_before, os.getloadavg()[0]]
    results["settings"] = {**vars(settings), "store": args.store}
    command = "python benchmarks/registry.py" + (" " + " ".join(argv) if argv else "")
    if argv is None and len(sys.argv) > 1:
        command = "python benchmarks/registry.py " + " ".join(sys.argv[1:])
    print(report(results, command))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the registry process is stopped on the way


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    raise SystemExit(main())
