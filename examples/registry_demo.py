"""The registry across processes, Bookinfo style: a canary rolled out with ``meshctl apply``
and an instance killed, while traffic flows.

    python examples/registry_demo.py [--seconds 2] [--data DIR]

Every part is its own process on 127.0.0.1, as on separate hosts:

* the registry: ``meshctl registry init`` into a temporary directory (its CA, its SVID and
  meshctl's admin SVID), then ``meshctl registry serve``;
* four workloads, each ``examples/registry_workload.py`` with its own SVID from
  ``meshctl ca issue``: ``productpage``, two instances of ``reviews-v1`` and one of
  ``reviews-v2``. Each builds its mesh with ``Mesh.from_env()`` and is served by
  ``meshlib.serve``, which registers it in the registry and heartbeats;
* this script drives steady traffic into ``http://productpage/`` through its own mesh (service
  ``loadgen``), which finds productpage, like productpage finds reviews, through the registry.

The policy lives in the registry only: a Gateway API HTTPRoute splits ``reviews`` over
reviews-v1 and reviews-v2 by its backendRefs' weights. The script applies 100/0, then 90/10 and
50/50 with ``meshctl apply`` and prints how soon and how much the traffic shifted; then it
SIGKILLs one reviews-v1 instance (no drain: the registry has to notice the silence) and prints
when the callers' endpoint sets lost it (at most one TTL, 10 s, plus the registry's 1 s expiry
pass) and how many calls failed (none: a refused connection is retried on the other instance).
Every process is stopped at the end, also on Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import meshlib
from meshlib.control.client import RegistryClient

TRUST_DOMAIN = "bookinfo.local"
WORKLOAD = Path(__file__).resolve().parent / "registry_workload.py"
#: The registry's default instance TTL (the workloads register with it).
TTL = 10.0

POLICY = """\
apiVersion: meshlib/v1
kind: Mesh
metadata: {{name: bookinfo}}
spec: {{trustDomain: {td}, mtls: strict}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: loadgen}}
spec: {{serviceAccount: loadgen}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: productpage}}
spec: {{serviceAccount: productpage}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews}}
spec: {{serviceAccount: reviews}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews-v1}}
spec: {{serviceAccount: reviews}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews-v2}}
spec: {{serviceAccount: reviews}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews-canary}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews}}]
  rules:
  - backendRefs:   # port: the spec requires it; registered instances carry their own
    - {{name: reviews-v1, port: 9080, weight: {v1}}}
    - {{name: reviews-v2, port: 9080, weight: {v2}}}
"""


def policy(v1: int, v2: int) -> str:
    return POLICY.format(td=TRUST_DOMAIN, v1=v1, v2=v2)


@dataclass
class Process:
    """A child process in its own process group (killed as a group), stdout read by a thread."""

    name: str
    popen: subprocess.Popen[bytes]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def read(self, stdout: IO[bytes]) -> None:
        for raw in stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float) -> str:
        """The first stdout line starting with ``prefix``; RuntimeError if it never comes."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.popen.poll() is not None:
                    break
                continue
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"{self.name} did not print {prefix!r} (exit {self.popen.poll()})")

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(self.popen.pid, sig)


class Processes:
    """Every process the demo starts; :meth:`stop_all` ends them all (SIGTERM, then SIGKILL)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[Process] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        with open(self.logs / f"{name}.log", "wb") as log:  # uvicorn's and the mesh's logs
            popen = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=log,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # its own process group: killpg reaches its children
            )
        assert popen.stdout is not None
        process = Process(name, popen)
        threading.Thread(target=process.read, args=(popen.stdout,), daemon=True).start()
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.signal(signal.SIGKILL)
                process.popen.wait(timeout=5)
        alive = [p.name for p in self.started if p.popen.poll() is None]
        pids = " ".join(str(p.popen.pid) for p in self.started)
        print(f"stopped {len(self.started)} processes (pids {pids}); still running: {alive or 0}")


def q(path: Path) -> str:
    return shlex.quote(str(path))


def meshctl(command: str, *, env: dict[str, str], show: bool = True) -> str:
    """Run ``meshctl COMMAND`` (``python -m meshlib.cli``) as a user would, echoing it."""
    args = shlex.split(command)
    done = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", *args],
        capture_output=True,
        env={**os.environ, **env},
        timeout=60,
    )
    output = done.stdout.decode() + done.stderr.decode()
    if done.returncode != 0:
        raise RuntimeError(f"meshctl {command} exited {done.returncode}:\n{output}")
    if show:
        print(f"$ meshctl {command}")
        print("  " + output.rstrip().replace("\n", "\n  "))
    return output


def start_registry(
    procs: Processes, data: Path, accounts: Sequence[tuple[str, str]], show: str
) -> tuple[str, dict[str, str], dict[str, Path]]:
    """``meshctl registry init`` into ``data/registry``, an SVID per ``(namespace, service
    account)`` from ``meshctl ca issue`` (echoed for ``show`` only), then ``meshctl registry
    serve`` on a free port: its URL, the environment meshctl runs with as the registry's admin,
    and the SVID directory per service account."""
    reg = data / "registry"
    meshctl(f"registry init --data {q(reg)} --trust-domain {TRUST_DOMAIN}", env={})
    svids = {}
    for namespace, account in accounts:
        svids[account] = data / "svids" / account
        meshctl(
            f"ca issue --dir {q(reg / 'ca')} --namespace {namespace} "
            f"--service-account {account} --out {q(svids[account])}",
            env={},
            show=account == show,
        )
    serve = f"registry serve --data {q(reg)} --listen 127.0.0.1:0"
    process = procs.start("registry", [sys.executable, "-m", "meshlib.cli", *shlex.split(serve)])
    url = process.wait_for("registry serving on ", 30).split()[3]
    print(f"registry serving on {url} (pid {process.popen.pid})")
    return url, {"MESHLIB_REGISTRY": url, "MESHLIB_SVID_DIR": str(reg / "admin")}, svids


def mesh_env(url: str, service: str, svid_dir: Path, cache_dir: Path) -> dict[str, str]:
    """What ``Mesh.from_env()`` in a started process reads: the registry, its service, its SVID
    and where it caches the registry's answers."""
    return {
        "MESHLIB_REGISTRY": url,
        "MESHLIB_SERVICE": service,
        "MESHLIB_SVID_DIR": str(svid_dir),
        "MESHLIB_CACHE_DIR": str(cache_dir),
    }


@dataclass(frozen=True)
class Call:
    at: float  # monotonic, when the answer came
    wall: float  # the same instant on the wall clock (the registry stamps versions with it)
    ok: bool
    service: str  # reviews-v1 / reviews-v2 ("" for a failed call)
    instance: str
    sent: float = 0.0  # monotonic, when the request went out


class Traffic:
    """Steady GETs to http://productpage/ from ``workers`` threads, each paced."""

    def __init__(self, mesh: meshlib.Mesh, workers: int = 4, pause: float = 0.02) -> None:
        self.mesh = mesh
        self.calls: list[Call] = []
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pause = pause
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def _run(self) -> None:
        with self.mesh.client(timeout=5.0) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                call = Call(sent, time.time(), False, "", "", sent)
                try:
                    answer = client.get("http://productpage/productpage")
                    if answer.status_code == 200:
                        reviews = answer.json()["reviews"]
                        service, instance = reviews["service"], reviews["instance"]
                        call = Call(time.monotonic(), time.time(), True, service, instance, sent)
                    else:
                        self.errors[f"{answer.status_code} {answer.text[:80]}"] += 1
                except Exception as exc:  # counted and shown: a failed call is the finding
                    self.errors[f"{type(exc).__name__}: {exc}"] += 1
                with self._lock:
                    self.calls.append(call)
                self._stop.wait(self._pause)

    def since(self, start: float) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.at >= start]

    def first(self, wall: float, service: str, timeout: float) -> float | None:
        """Seconds from ``wall`` (wall clock) to the first answer from ``service`` after it
        (None: none within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                hits = [c.wall for c in self.calls if c.service == service and c.wall >= wall]
            if hits:
                return min(hits) - wall
            self._stop.wait(0.02)
        return None


def endpoints(mesh: meshlib.Mesh, service: str) -> set[str]:
    """The addresses ``mesh`` discovered for ``service`` (what its calls can pick)."""
    found = mesh.discovered().get(f"{service}.default")
    return set() if found is None else {e.address for e in found.endpoints}


def share(calls: list[Call], service: str) -> str:
    ok = [c for c in calls if c.ok]
    hits = sum(c.service == service for c in ok)
    pct = 100.0 * hits / len(ok) if ok else 0.0
    return f"{service} {pct:.1f}% of {len(ok)} calls"


def run(data: Path, seconds: float) -> None:
    procs = Processes(data)
    loadgen: meshlib.Mesh | None = None
    traffic: Traffic | None = None
    reader: RegistryClient | None = None
    try:
        print("== 1. a registry, and an SVID per workload ==")
        accounts = [("default", a) for a in ("productpage", "reviews", "loadgen")]
        url, admin, svids = start_registry(procs, data, accounts, show="productpage")
        reader = RegistryClient(url, svid_dir=admin["MESHLIB_SVID_DIR"])
        (data / "v100.yaml").write_text(policy(100, 0))
        meshctl(f"apply -f {q(data / 'v100.yaml')}", env=admin)

        print("\n== 2. four workloads register themselves ==")

        def launch(name: str, service: str, account: str) -> Process:
            env = mesh_env(url, service, svids[account], data / "cache" / name)
            return procs.start(name, [sys.executable, str(WORKLOAD), "--seed", "11"], env)

        def serving(process: Process) -> None:
            line = process.wait_for("serving ", 60)  # "serving SERVICE on https://HOST:PORT"
            addresses[process.name] = line.rsplit("/", 1)[1]
            print(f"  {line} (pid {process.popen.pid})")

        def until_seen(counts: dict[str, int]) -> None:
            deadline = time.monotonic() + 30
            while {s: len(endpoints(loadgen, s)) for s in counts} != counts:
                if time.monotonic() > deadline:
                    raise RuntimeError("the workloads did not all appear in the registry")
                time.sleep(0.05)

        addresses: dict[str, str] = {}
        # The callees first: productpage then finds them in its start-up fetch, so its first
        # request already has somewhere to go (one started before them would answer 502 until
        # its watch saw them register, about a second).
        reviews = [
            launch("reviews-v1-a", "reviews-v1", "reviews"),
            launch("reviews-v1-b", "reviews-v1", "reviews"),
            launch("reviews-v2", "reviews-v2", "reviews"),
        ]
        for process in reviews:
            serving(process)
        loadgen = meshlib.Mesh.from_registry(
            url,
            service="loadgen",
            svid_dir=svids["loadgen"],
            cache_dir=data / "cache" / "loadgen",
            metrics=False,
        )
        until_seen({"reviews-v1": 2, "reviews-v2": 1})
        serving(launch("productpage", "productpage", "productpage"))
        until_seen({"productpage": 1, "reviews-v1": 2, "reviews-v2": 1})
        meshctl("get instances", env=admin)

        print("\n== 3. steady traffic: loadgen → productpage → reviews (split 100/0) ==")
        traffic = Traffic(loadgen)
        start = time.monotonic()
        traffic.start()
        time.sleep(seconds)
        print(f"  {share(traffic.since(start), 'reviews-v1')}")

        print("\n== 4. the canary, rolled out with meshctl apply ==")
        for v1, v2 in ((90, 10), (50, 50)):
            (data / f"v{v1}.yaml").write_text(policy(v1, v2))
            meshctl(f"apply -f {q(data / f'v{v1}.yaml')}", env=admin)
            # When the registry took the version (its wall-clock stamp, this host's clock):
            created = max(reader.history(), key=lambda v: v.version).created_at or 0.0
            first = traffic.first(created, "reviews-v2", timeout=10)
            if v2 == 10:  # from none to some: the first call on the canary is the shift
                took = "none within 10 s" if first is None else f"{first:.2f} s"
                print(
                    f"  canary {v1}/{v2}: first call on reviews-v2 {took} after the registry "
                    "accepted the version"
                )
            window = time.monotonic()
            time.sleep(seconds)
            print(
                f"  split {v1}/{v2}: {share(traffic.since(window), 'reviews-v2')} "
                f"(configured {v2}%)"
            )
        meshctl("registry status", env=admin)

        print("\n== 5. SIGKILL one reviews-v1 instance: no drain, the TTL must notice ==")
        victim = reviews[0]
        gone = addresses[victim.name]
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.popen.wait(timeout=10)
        dead = time.monotonic()  # from here no request can reach it
        print(f"  SIGKILL {victim.name} at {gone} (pid {victim.popen.pid})")
        deadline = killed + TTL + 5
        while gone in endpoints(loadgen, "reviews-v1") and time.monotonic() < deadline:
            time.sleep(0.05)
        moved = time.monotonic() - killed
        time.sleep(1.0)  # a little traffic on the set without it
        after = traffic.since(killed)
        traffic.stop()
        failed = sum(not c.ok for c in after)
        # Requests sent once it was dead (one sent just before can still have its answer).
        by_instance = Counter(
            c.instance for c in after if c.service == "reviews-v1" and c.sent >= dead
        )
        if gone in endpoints(loadgen, "reviews-v1"):
            print(f"  NOT removed from the callers' endpoints within {moved:.1f} s")
        else:
            print(
                f"  its traffic moved: gone from the callers' endpoints {moved:.1f} s after the "
                f"kill (TTL {TTL:.0f} s)"
            )
        survivor = addresses[reviews[1].name]
        print(
            f"  reviews-v1 calls since the kill: {by_instance[survivor]} on {survivor}, "
            f"{by_instance[gone]} on {gone}"
        )
        print(f"  failed calls since the kill: {failed} of {len(after)}")
        print(
            "  (meanwhile productpage's connects to the dead instance were refused and retried"
            " on the other one, and outlier detection ejected it)"
        )
        for error, count in traffic.errors.most_common(3):
            print(f"    {count} × {error}")
        meshctl("get instances", env=admin)
    finally:
        if traffic is not None:
            traffic.stop()
        if loadgen is not None:
            loadgen.close()
        if reader is not None:
            reader.close()
        procs.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="traffic per phase")
    parser.add_argument("--data", type=Path, help="keep the registry's data here (default: temp)")
    args = parser.parse_args()
    if args.data is not None:
        args.data.mkdir(parents=True, exist_ok=True)
        run(args.data, args.seconds)
        return
    with tempfile.TemporaryDirectory(prefix="meshlib-registry-demo-") as tmp:
        run(Path(tmp), args.seconds)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: every process was stopped", file=sys.stderr)
        sys.exit(130)
