"""Inbound benchmark: MeshMiddleware against bare uvicorn, a naive middleware and an nginx hop.

    python benchmarks/inbound.py [--quick] [--json out.json]

Every variant is ``benchmarks/inbound_app.py`` (uvicorn, 1 worker, asyncio loop, h11, no access
log) in its own process on 127.0.0.1:

* ``bare uvicorn``: a tiny pure-ASGI ``200 ok`` app;
* ``MeshMiddleware``: the same app in ``meshlib.MeshMiddleware`` (minimal policy, no TLS);
* ``naive span+2 metrics``: the same app in a hand-written pure-ASGI middleware with an
  OpenTelemetry SDK span (SimpleSpanProcessor + InMemorySpanExporter) and two prometheus-client
  metrics updated through ``.labels()`` per request;
* ``nginx -> bare uvicorn``: nginx (1 worker, keep-alive upstream) in front of a separate bare
  process;
* ``MeshMiddleware + mTLS`` (server CPU only): ``meshlib.serve`` strict mode, SVID client.

Measured, all variants interleaved (round-robin, rotating the first variant each round):

1. server CPU per request: one keep-alive connection from a minimal blocking HTTP/1.1 client in
   this process; the server's CPU is read through ``GET /__cpu`` (``time.process_time_ns`` in the
   server, outside the middleware) before and after each round; nginx's own CPU from /proc;
2. throughput: ``wrk -t1 -c32`` for a few seconds per variant and round (skipped without wrk);
3. TLS: full mTLS handshakes (new connection + one request) against ``meshlib.serve`` strict,
   against new plain connections to MeshMiddleware, and the time of ``Server.reload_svid()``
   with a freshly issued valid pair.

The output is Markdown, ready to paste into docs/performance.md. Importing this module has no side
effects; everything happens in :func:`main`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

try:  # imported as the ``benchmarks`` package (e.g. from a test)
    from benchmarks import nginx as nginx_ctl
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    import nginx as nginx_ctl  # type: ignore[no-redef]

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
APP_SCRIPT = BENCH_DIR / "inbound_app.py"

CPU_TARGET_US = 10.0  # at most 10 µs of added server CPU per request (no TLS)
THROUGHPUT_TARGET = 0.70  # at least 70% of bare uvicorn's requests/s under load
CONNECTIONS = 32

BARE = "bare uvicorn"
MESH = "MeshMiddleware"
NAIVE = "naive span+2 metrics"
NGINX = "nginx -> bare uvicorn"
MESH_TLS = "MeshMiddleware + mTLS strict"


# --- small helpers --------------------------------------------------------------------------------


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays paste-able Markdown."""
    print(message, file=sys.stderr, flush=True)


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{digits}f}"


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def median_ci(values: Sequence[float], resamples: int = 2000) -> tuple[float, float]:
    """95% percentile-bootstrap CI of the median (fixed seed)."""
    import random

    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = random.Random(0)
    meds = [statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)]
    return (percentile(meds, 2.5), percentile(meds, 97.5))


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    binary = nginx_ctl.find_nginx()
    wrk = shutil.which("wrk")
    wrk_version = "not found"
    if wrk:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
        wrk_version = (out.stdout or out.stderr).splitlines()[0].split(" Copyright")[0]
    return {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "nproc": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "packages": {
            name: _version(name)
            for name in ("uvicorn", "h11", "opentelemetry-sdk", "prometheus-client", "cryptography")
        },
        "openssl": ssl.OPENSSL_VERSION,
        "server": "uvicorn, 1 worker, loop=asyncio, http=h11, access log off, separate process",
        "nginx": nginx_ctl.nginx_version(binary) if binary else "not found",
        "wrk": wrk_version,
    }


# --- a minimal blocking HTTP/1.1 client -----------------------------------------------------------


class RawClient:
    """One keep-alive connection; ``get(path)`` sends a GET and reads a Content-Length reply.
    ``host`` is the Host header and, with TLS, the SNI name (benchmarks/gateway.py's listener
    serves one name).

    Far cheaper than httpx, so the client process spends little CPU between server requests.
    """

    def __init__(
        self, port: int, context: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.port = port
        self.context = context
        self.host = host
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock
        self.buf = b""
        return sock

    def get(self, path: str = "/") -> tuple[int, bytes]:
        sock = self.sock or self.connect()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self._recv(sock)
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            rest += self._recv_chunk(sock)
        self.buf = rest[length:]
        return status, rest[:length]

    def _recv_chunk(self, sock: socket.socket) -> bytes:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def _recv(self, sock: socket.socket) -> None:
        self.buf += self._recv_chunk(sock)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


# --- server processes -----------------------------------------------------------------------------


class LineReader:
    """Lines from a child's stdout pipe, with a deadline (select on the raw fd)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from the server process in time")
            ready, _, _ = select.select([self.fd], [], [], min(remaining, 0.2))
            if ready:
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    raise RuntimeError(f"server exited early (status {self.proc.wait()})")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")


@dataclass
class AppServer:
    """One ``benchmarks/inbound_app.py`` process."""

    variant: str
    proc: subprocess.Popen[bytes]
    reader: LineReader
    port: int
    log_path: Path
    context: ssl.SSLContext | None = None
    _control: RawClient | None = None

    def cpu_ns(self) -> int:
        """The server process's CPU time so far (its own ``time.process_time_ns``)."""
        if self._control is None:
            self._control = RawClient(self.port, self.context)
        status, body = self._control.get("/__cpu")
        if status != 200:
            raise RuntimeError(f"/__cpu answered {status}")
        return int(body)

    def command(self, line: str, timeout: float = 30.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.reader.readline(timeout)

    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self.proc.stdin is not None:  # tls: EOF on stdin stops meshlib.serve gracefully
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        nginx_ctl.stop_process(self.proc, signal.SIGTERM)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_app(
    variant: str,
    stack: contextlib.ExitStack,
    tmpdir: Path,
    *,
    svid_dir: Path | None = None,
    context: ssl.SSLContext | None = None,
) -> AppServer:
    log_path = tmpdir / f"app-{variant}-{len(list(tmpdir.glob('app-*.log')))}.log"
    cmd = [sys.executable, str(APP_SCRIPT), "--variant", variant]
    if svid_dir is not None:
        cmd += ["--svid-dir", str(svid_dir)]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if variant == "tls" else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            cwd=str(BENCH_DIR),
            start_new_session=True,  # a Ctrl-C reaches only us; we stop the servers
        )
    stack.callback(nginx_ctl.stop_process, proc, signal.SIGTERM)
    reader = LineReader(proc)
    try:
        line = reader.readline(30.0)
        match = re.search(r"PORT (\d+)", line)
        if match is None:
            raise RuntimeError(f"unexpected server output {line!r}")
        port = int(match.group(1))
        nginx_ctl.wait_for_port(port, proc, 10.0)
    except Exception as exc:
        raise RuntimeError(f"{exc}; server log:\n{log_path.read_text(errors='replace')}") from exc
    server = AppServer(variant, proc, reader, port, log_path, context)
    stack.callback(server.stop)
    server.cpu_ns()  # first request through the whole stack: imports, lazy init
    return server


# --- 1. server CPU per request (sequential, one keep-alive connection) ----------------------------


@dataclass
class CpuVariant:
    name: str
    server: AppServer  # the uvicorn process whose CPU is read (the upstream, for nginx)
    client: RawClient
    proxy_pids: Callable[[], list[int]] | None = None
    round_us: list[float] = field(default_factory=list)  # server CPU per request, per round
    proxy_cpu_s: float = 0.0
    wall_us: list[float] = field(default_factory=list)  # client wall per request, per round
    requests: int = 0
    errors: int = 0


def _cpu_round(v: CpuVariant, n: int, record: bool) -> None:
    gc.collect()
    pids = v.proxy_pids() if v.proxy_pids else []
    x0 = nginx_ctl.process_cpu_seconds(pids) if pids else 0.0
    c0 = v.server.cpu_ns()
    bad = 0
    w0 = time.perf_counter_ns()
    for _ in range(n):
        status, _ = v.client.get("/")
        if status != 200:
            bad += 1
    w1 = time.perf_counter_ns()
    c1 = v.server.cpu_ns()
    if record:
        v.round_us.append((c1 - c0) / n / 1e3)
        v.wall_us.append((w1 - w0) / n / 1e3)
        v.requests += n
        v.errors += bad
        if pids:
            v.proxy_cpu_s += nginx_ctl.process_cpu_seconds(pids) - x0


def measure_cpu(variants: list[CpuVariant], rounds: int, n: int, warmup: int) -> list[dict]:
    for v in variants:
        _cpu_round(v, warmup, record=False)
    for r in range(rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            _cpu_round(v, n, record=True)
    bare = variants[0]
    rows = []
    for v in variants:
        proxy_us = v.proxy_cpu_s / v.requests * 1e6 if v.proxy_pids else 0.0
        total_rounds = [u + proxy_us for u in v.round_us]
        deltas = [t - b for t, b in zip(total_rounds, bare.round_us, strict=True)]
        lo, hi = median_ci(deltas)
        rows.append(
            {
                "variant": v.name,
                "server_cpu_us": statistics.median(v.round_us),
                "server_cpu_us_min": min(v.round_us),
                "server_cpu_us_max": max(v.round_us),
                "proxy_cpu_us": proxy_us if v.proxy_pids else None,
                "total_cpu_us": statistics.median(total_rounds),
                "delta_us": statistics.median(deltas) if v is not bare else 0.0,
                "delta_ci_us": [lo, hi] if v is not bare else None,
                "wall_us": statistics.median(v.wall_us),
                "requests": v.requests,
                "errors": v.errors,
            }
        )
    return rows


# --- 2. throughput under load (wrk) ---------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk(url: str, seconds: float, connections: int) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", url]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 30, check=False
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "p99_ms": float(p99.group(1)) * _UNITS[p99.group(2)] if p99 else float("nan"),
        "errors": (int(non2xx.group(1)) if non2xx else 0)
        + (sum(int(g) for g in sock_err.groups()) if sock_err else 0),
    }


@dataclass
class LoadVariant:
    name: str
    port: int  # where wrk connects
    server: AppServer  # the uvicorn process whose CPU is read
    proxy_pids: Callable[[], list[int]] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)


def _load_run(v: LoadVariant, seconds: float, record: bool) -> None:
    gc.collect()
    pids = v.proxy_pids() if v.proxy_pids else []
    x0 = nginx_ctl.process_cpu_seconds(pids) if pids else 0.0
    c0 = v.server.cpu_ns()
    result = _wrk(f"http://127.0.0.1:{v.port}/", seconds, CONNECTIONS)
    c1 = v.server.cpu_ns()
    if record:
        result["server_cpu_us"] = (c1 - c0) / max(result["requests"], 1) / 1e3
        if pids:
            result["proxy_cpu_us"] = (
                (nginx_ctl.process_cpu_seconds(pids) - x0) / max(result["requests"], 1) * 1e6
            )
        v.runs.append(result)


def measure_load(variants: list[LoadVariant], rounds: int, seconds: float, warmup: float) -> list:
    if warmup > 0:
        for v in variants:
            _load_run(v, warmup, record=False)
    for r in range(rounds):
        shift = r % len(variants)
        for v in variants[shift:] + variants[:shift]:
            log(f"  wrk round {r + 1}/{rounds}: {v.name}")
            _load_run(v, seconds, record=True)
    bare = variants[0]
    rows = []
    for v in variants:
        ratios = [x["rps"] / b["rps"] for x, b in zip(v.runs, bare.runs, strict=True)]
        proxy = [x["proxy_cpu_us"] for x in v.runs if "proxy_cpu_us" in x]
        rows.append(
            {
                "variant": v.name,
                "rps": statistics.median(x["rps"] for x in v.runs),
                "rps_all": [x["rps"] for x in v.runs],
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "p99_ms": statistics.median(x["p99_ms"] for x in v.runs),
                "server_cpu_us": statistics.median(x["server_cpu_us"] for x in v.runs),
                "proxy_cpu_us": statistics.median(proxy) if proxy else None,
                "errors": sum(x["errors"] for x in v.runs),
            }
        )
    return rows


# --- 3. TLS: handshakes and rotation --------------------------------------------------------------


def make_svids(tmpdir: Path) -> tuple[Any, Path, Path]:
    """A CA, the server's SVID directory and a client's SVID directory."""
    sys.path.insert(0, str(BENCH_DIR))
    from inbound_app import SERVICE, TRUST_DOMAIN

    from meshlib.identity import CertificateAuthority, SpiffeID

    ca = CertificateAuthority.create(TRUST_DOMAIN)
    server_dir = tmpdir / "svid-server"
    client_dir = tmpdir / "svid-client"
    ca.issue(SpiffeID.for_workload(TRUST_DOMAIN, "default", SERVICE)).save(server_dir)
    ca.issue(SpiffeID.for_workload(TRUST_DOMAIN, "default", "web")).save(client_dir)
    return ca, server_dir, client_dir


def _new_connection_request(port: int, context: ssl.SSLContext | None) -> tuple[float, bytes]:
    """Wall seconds of connect (+ handshake) + one GET + close, and the peer's leaf (DER)."""
    client = RawClient(port, context)
    t0 = time.perf_counter()
    sock = client.connect()
    status, _ = client.get("/")
    elapsed = time.perf_counter() - t0
    leaf = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else b""
    client.close()
    if status != 200:
        raise RuntimeError(f"new-connection request answered {status}")
    return elapsed, leaf or b""


def measure_tls(
    plain: AppServer,
    tls: AppServer,
    client_ctx: ssl.SSLContext,
    ca: Any,
    server_dir: Path,
    handshakes: int,
    rotations: int,
) -> dict[str, Any]:
    from cryptography import x509

    from meshlib.identity import SpiffeID

    sequences: dict[str, dict[str, Any]] = {
        "plain": {"server": plain, "ctx": None, "wall": [], "cpu_ns": 0, "n": 0},
        "tls": {"server": tls, "ctx": client_ctx, "wall": [], "cpu_ns": 0, "n": 0},
    }
    for s in sequences.values():  # warm-up
        for _ in range(5):
            _new_connection_request(s["server"].port, s["ctx"])
    batch = 10
    for i in range(max(handshakes // batch, 1)):
        order = ["plain", "tls"] if i % 2 == 0 else ["tls", "plain"]
        for key in order:
            s = sequences[key]
            c0 = s["server"].cpu_ns()
            for _ in range(batch):
                s["wall"].append(_new_connection_request(s["server"].port, s["ctx"])[0])
            s["cpu_ns"] += s["server"].cpu_ns() - c0
            s["n"] += batch

    # rotation: a freshly issued pair for the same identity, then reload_svid() in the server
    service_id = SpiffeID.for_workload(ca.trust_domain, "default", "bench")
    reload_s: list[float] = []
    served_new = 0
    post_rotation_ms: list[float] = []
    for _ in range(rotations):
        svid = ca.issue(service_id)
        svid.save(server_dir)
        answer = tls.command("reload")
        parts = answer.split()
        if parts[0] != "RELOAD":
            raise RuntimeError(f"reload failed: {answer}")
        reload_s.append(float(parts[1]))
        elapsed, leaf = _new_connection_request(tls.port, client_ctx)
        post_rotation_ms.append(elapsed * 1e3)
        if x509.load_der_x509_certificate(leaf).serial_number == svid.certificate.serial_number:
            served_new += 1

    def summary(s: dict[str, Any]) -> dict[str, Any]:
        wall_ms = [w * 1e3 for w in s["wall"]]
        return {
            "n": s["n"],
            "wall_ms_p50": statistics.median(wall_ms),
            "wall_ms_p90": percentile(wall_ms, 90),
            "server_cpu_us_per_conn": s["cpu_ns"] / s["n"] / 1e3,
        }

    plain_s, tls_s = summary(sequences["plain"]), summary(sequences["tls"])
    return {
        "plain": plain_s,
        "tls": tls_s,
        "handshake_ms": tls_s["wall_ms_p50"] - plain_s["wall_ms_p50"],
        "handshakes_per_s_sequential": 1e3 / tls_s["wall_ms_p50"],
        "handshake_server_cpu_us": tls_s["server_cpu_us_per_conn"]
        - plain_s["server_cpu_us_per_conn"],
        "reload_ms": [s * 1e3 for s in reload_s],
        "reload_ms_median": statistics.median(reload_s) * 1e3 if reload_s else float("nan"),
        "rotations": rotations,
        "rotations_served_new_cert": served_new,
        "post_rotation_conn_ms_median": statistics.median(post_rotation_ms)
        if post_rotation_ms
        else float("nan"),
    }


# --- orchestration --------------------------------------------------------------------------------


@dataclass
class Config:
    cpu_rounds: int
    cpu_requests: int
    cpu_warmup: int
    load_rounds: int
    load_seconds: float
    load_warmup: float
    handshakes: int
    rotations: int


QUICK = Config(3, 300, 200, 1, 1.0, 0.0, 40, 2)
FULL = Config(15, 2000, 1000, 5, 4.0, 1.0, 400, 7)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    if str(REPO_ROOT) not in sys.path:  # benchmark the checkout, installed or not
        sys.path.insert(0, str(REPO_ROOT))
    cfg = QUICK if args.quick else FULL
    results: dict[str, Any] = {
        "command": command,
        "machine": machine_info(),
        "config": cfg.__dict__,
        "skipped": {},
    }
    nginx_binary = nginx_ctl.find_nginx()
    wrk = shutil.which("wrk")
    with contextlib.ExitStack() as stack, _sigterm_as_interrupt():
        tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshlib-inb-")))
        ca, server_dir, client_dir = make_svids(tmpdir)
        from meshlib.identity.tls import SVIDSource

        client_ctx = SVIDSource(client_dir).client_context()
        log("starting servers")
        bare = start_app("bare", stack, tmpdir)
        mesh = start_app("mesh", stack, tmpdir)
        naive = start_app("naive", stack, tmpdir)
        tls = start_app("tls", stack, tmpdir, svid_dir=server_dir, context=client_ctx)
        proxy: nginx_ctl.Nginx | None = None
        upstream: AppServer | None = None
        if nginx_binary is None:
            results["skipped"][NGINX] = "skipped: nginx not found"
        else:
            upstream = start_app("bare", stack, tmpdir)
            proxy = nginx_ctl.Nginx(upstream.port, nginx_binary).start()
            stack.callback(proxy.stop)

        def client(port: int, ctx: ssl.SSLContext | None = None) -> RawClient:
            c = RawClient(port, ctx)
            stack.callback(c.close)
            return c

        cpu_variants = [
            CpuVariant(BARE, bare, client(bare.port)),
            CpuVariant(MESH, mesh, client(mesh.port)),
            CpuVariant(NAIVE, naive, client(naive.port)),
        ]
        if proxy is not None and upstream is not None:
            cpu_variants.append(CpuVariant(NGINX, upstream, client(proxy.port), proxy.pids))
        cpu_variants.append(CpuVariant(MESH_TLS, tls, client(tls.port, client_ctx)))
        log(f"server CPU: {cfg.cpu_rounds} rounds x {cfg.cpu_requests} requests per variant")
        results["cpu"] = measure_cpu(cpu_variants, cfg.cpu_rounds, cfg.cpu_requests, cfg.cpu_warmup)

        if wrk is None:
            results["skipped"]["throughput"] = "skipped: wrk not found"
        else:
            load_variants = [
                LoadVariant(BARE, bare.port, bare),
                LoadVariant(MESH, mesh.port, mesh),
                LoadVariant(NAIVE, naive.port, naive),
            ]
            if proxy is not None and upstream is not None:
                load_variants.append(LoadVariant(NGINX, proxy.port, upstream, proxy.pids))
            log(f"throughput: wrk -t1 -c{CONNECTIONS}, {cfg.load_rounds} x {cfg.load_seconds:g} s")
            results["load"] = measure_load(
                load_variants, cfg.load_rounds, cfg.load_seconds, cfg.load_warmup
            )

        log(f"TLS: {cfg.handshakes} handshakes, {cfg.rotations} rotations")
        results["tls"] = measure_tls(
            mesh, tls, client_ctx, ca, server_dir, cfg.handshakes, cfg.rotations
        )
    results["verdicts"] = verdicts(results)
    return results


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` runs and every child is stopped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def verdicts(results: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    mesh = next(r for r in results["cpu"] if r["variant"] == MESH)
    lo, hi = mesh["delta_ci_us"]
    if hi <= CPU_TARGET_US:
        word = "PASS"
    elif lo > CPU_TARGET_US:
        word = "FAIL"
    else:
        word = (
            "PASS (point estimate; CI straddles)"
            if mesh["delta_us"] <= CPU_TARGET_US
            else ("FAIL (point estimate; CI straddles)")
        )
    out["cpu"] = (
        f"{word}: MeshMiddleware adds {mesh['delta_us']:+.1f} µs server CPU per request "
        f"(95% CI {lo:+.1f} … {hi:+.1f}) vs target ≤ {CPU_TARGET_US:g} µs"
    )
    if "load" in results:
        row = next(r for r in results["load"] if r["variant"] == MESH)
        word = "PASS" if row["ratio"] >= THROUGHPUT_TARGET else "FAIL"
        out["throughput"] = (
            f"{word}: MeshMiddleware keeps {row['ratio'] * 100:.0f}% of bare uvicorn's "
            f"requests/s (rounds {row['ratio_min'] * 100:.0f}–{row['ratio_max'] * 100:.0f}%) "
            f"vs target ≥ {THROUGHPUT_TARGET * 100:.0f}%"
        )
    else:
        out["throughput"] = "skipped (wrk not found)"
    return out


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    cfg = results["config"]
    lines = [
        "## Inbound middleware benchmark",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['cpu_model']}, {m['nproc']} CPUs, {m['python']}, {m['platform']}, "
        f"load at start {m['loadavg_at_start'][0]:.2f}  ",
        f"Packages: {', '.join(f'{k} {v}' for k, v in m['packages'].items())}; {m['openssl']}; "
        f"{m['nginx']}; {m['wrk']}  ",
        f"Server: {m['server']}",
        "",
        f"### Server CPU per request (one keep-alive connection, {cfg['cpu_rounds']} interleaved "
        f"rounds x {cfg['cpu_requests']} requests)",
        "",
        "| variant | server CPU µs/req (median, min–max) | proxy CPU µs/req | Δ vs bare µs "
        "(95% CI) | client wall µs/req | requests | errors |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results["cpu"]:
        ci = r["delta_ci_us"]
        delta = "-" if ci is None else f"{r['delta_us']:+.1f} ({ci[0]:+.1f}, {ci[1]:+.1f})"
        lines.append(
            f"| {r['variant']} | {fmt(r['server_cpu_us'])} ({fmt(r['server_cpu_us_min'])}–"
            f"{fmt(r['server_cpu_us_max'])}) | {fmt(r['proxy_cpu_us'])} | {delta} "
            f"| {fmt(r['wall_us'])} | {r['requests']} | {r['errors']} |"
        )
    if NGINX in results["skipped"]:
        lines.append(f"| {NGINX} | {results['skipped'][NGINX]} | | | | | |")
    lines += [
        "",
        f"### Throughput under load (wrk -t1 -c{CONNECTIONS}, {cfg['load_rounds']} interleaved "
        f"rounds x {cfg['load_seconds']:g} s)",
        "",
    ]
    if "load" not in results:
        lines.append(f"Throughput: {results['skipped'].get('throughput', 'skipped')}.")
    else:
        lines += [
            "| variant | requests/s (median) | ratio to bare (median, min–max) | p99 ms "
            "| server CPU µs/req under load | proxy CPU µs/req | errors |",
            "|---|--:|--:|--:|--:|--:|--:|",
        ]
        for r in results["load"]:
            lines.append(
                f"| {r['variant']} | {fmt(r['rps'], 0)} | {r['ratio'] * 100:.0f}% "
                f"({r['ratio_min'] * 100:.0f}–{r['ratio_max'] * 100:.0f}%) | {fmt(r['p99_ms'], 2)} "
                f"| {fmt(r['server_cpu_us'])} | {fmt(r['proxy_cpu_us'])} | {r['errors']} |"
            )
        if NGINX in results["skipped"]:
            lines.append(f"| {NGINX} | {results['skipped'][NGINX]} | | | | | |")
    t = results["tls"]
    lines += [
        "",
        f"### mTLS (meshlib.serve strict + MeshMiddleware; {t['tls']['n']} new connections each, "
        f"{t['rotations']} rotations)",
        "",
        "| measure | value |",
        "|---|--:|",
        f"| new plain connection + GET, wall ms (p50 / p90) | {fmt(t['plain']['wall_ms_p50'], 3)} "
        f"/ {fmt(t['plain']['wall_ms_p90'], 3)} |",
        f"| new mTLS connection (full handshake) + GET, wall ms (p50 / p90) "
        f"| {fmt(t['tls']['wall_ms_p50'], 3)} / {fmt(t['tls']['wall_ms_p90'], 3)} |",
        f"| handshake cost, wall ms (p50 difference) | {fmt(t['handshake_ms'], 3)} |",
        f"| full handshakes/s, one sequential client "
        f"| {fmt(t['handshakes_per_s_sequential'], 0)} |",
        f"| server CPU per plain connection, µs | {fmt(t['plain']['server_cpu_us_per_conn'])} |",
        f"| server CPU per mTLS connection, µs | {fmt(t['tls']['server_cpu_us_per_conn'])} |",
        f"| server CPU per handshake (difference), µs | {fmt(t['handshake_server_cpu_us'])} |",
        f"| `reload_svid()` with a new valid pair, ms (median; all) | "
        f"{fmt(t['reload_ms_median'], 2)}; {', '.join(fmt(x, 2) for x in t['reload_ms'])} |",
        f"| new connections served the rotated certificate | "
        f"{t['rotations_served_new_cert']}/{t['rotations']} |",
        f"| first connection after a rotation, wall ms (median) "
        f"| {fmt(t['post_rotation_conn_ms_median'], 3)} |",
        "",
        "### Verdicts",
        "",
    ]
    for key, text in results["verdicts"].items():
        lines.append(f"- **{key}**: {text}")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (≤ 30 s)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    command = shlex.join(
        ["python", "benchmarks/inbound.py", *(sys.argv[1:] if argv is None else argv)]
    )
    try:
        results = run(args, command)
    except KeyboardInterrupt:
        log("interrupted: every process started was stopped")
        return 130
    results["total_seconds"] = time.monotonic() - started
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["finished_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    print(render_markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    log(f"done in {results['total_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
