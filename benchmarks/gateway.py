"""Ingress gateway vs nginx (issue 14): the latency each adds in front of one backend, requests/s
and CPU per request of the proxy process, for a plain and a TLS-terminating listener, in one run.

    python benchmarks/gateway.py [--quick] [--rounds R] [--requests N] [--json out.json]
        [--profile OUT]

The backend is ``benchmarks/server.py`` (uvicorn, 1 worker, h11, ``200 ok``) in its own process.
The paths to it: **direct** (the baseline); **nginx** (``benchmarks/nginx.py``: 1 worker,
keep-alive upstream) on a plain and on an HTTPS port; **the gateway**, ``meshctl gateway serve``
in its own process with a Gateway config (an HTTP and an HTTPS listener, the certificate made here
with ``cryptography``) and an HTTPRoute to the backend's Service, whose endpoint the gateway's
mesh policy declares (``mtls: disable``: nginx does no mesh mTLS either). Each proxy process is
pinned to one core, this process (the load generator), wrk and the backend to the other.

Latency: one keep-alive connection per path (benchmarks/inbound.py's minimal blocking HTTP/1.1
client, TLS through the ``ssl`` module), R interleaved rounds of N sequential requests with a
rotating start, each round on a fresh connection whose handshake and first requests are not timed.
Added latency = a path's percentile minus the direct path's. Throughput: ``wrk -t1 -c16`` per path,
interleaved rounds. CPU per request: the proxy's user+system time from /proc (master and worker for
nginx) over the requests of a phase. With ``--profile OUT`` the gateway runs under
``benchmarks/profiled.py`` and its cProfile stats land in ``OUT.<thread>``: its numbers are then
inflated and not comparable. Markdown goes to stdout, progress to stderr. Importing this module has
no side effects.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import select
import shlex
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # imported as the ``benchmarks`` package (e.g. from a test)
    from benchmarks import (
        inbound as inbound_bench,
        nginx as nginx_ctl,
        registry as registry_bench,
        run as bench,
    )
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    import inbound as inbound_bench  # type: ignore[no-redef]
    import nginx as nginx_ctl  # type: ignore[no-redef]
    import registry as registry_bench  # type: ignore[no-redef]
    import run as bench  # type: ignore[no-redef]

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PROFILED = BENCH_DIR / "profiled.py"
HOSTNAME = "bench.example.com"
TARGET_RATIO = 2.0  # issue 14: the gateway's added p50 within 2x of nginx's

GATEWAY_CONFIG = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: edge, namespace: edge}}
spec:
  gatewayClassName: meshlib
  listeners:
  - {{name: http, port: 80, protocol: HTTP}}
  - name: https
    port: 443
    protocol: HTTPS
    tls:
      mode: Terminate
      certificateRefs: [{{name: bench-cert}}]
---
apiVersion: v1
kind: Secret
metadata: {{name: bench-cert, namespace: edge}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
{cert}
  tls.key: |
{key}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: backend, namespace: edge}}
spec:
  parentRefs: [{{name: edge}}]
  rules:
  - backendRefs: [{{name: backend, namespace: bench, port: 80}}]
"""

MESH_POLICY = """\
apiVersion: meshlib/v1
kind: Mesh
metadata: {{name: mesh}}
spec: {{mtls: disable}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: gateway, namespace: edge}}
spec: {{endpoints: []}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: backend, namespace: bench}}
spec: {{endpoints: [{{address: "127.0.0.1:{port}"}}]}}
"""


# --- certificates, cores --------------------------------------------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """(CA file, certificate file, key file): a P-256 CA and a server leaf for HOSTNAME, made by
    the gateway tests' ``TestCA`` (``main`` put the checkout on the path)."""
    from tests.gateway.gwcerts import TestCA

    ca = TestCA.create("bench CA")
    leaf = ca.leaf(HOSTNAME)
    paths = (directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    for path, pem in zip(paths, (ca.pem, leaf.cert_pem, leaf.key_pem), strict=True):
        path.write_bytes(pem)
    return paths


def pin(pids: Sequence[int], cores: set[int]) -> None:
    """Pin every thread of ``pids`` (a thread started later inherits its creator's mask)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), cores)


# --- the gateway process --------------------------------------------------------------------------


class GatewayProcess:
    """``meshctl gateway serve`` in its own process (optionally under cProfile)."""

    def __init__(
        self, tmpdir: Path, backend_port: int, cert: Path, key: Path, profile: Path | None
    ) -> None:
        indent = "    "
        config = tmpdir / "gateway.yaml"
        config.write_text(
            GATEWAY_CONFIG.format(
                cert="\n".join(indent + line for line in cert.read_text().splitlines()),
                key="\n".join(indent + line for line in key.read_text().splitlines()),
            )
        )
        policy = tmpdir / "mesh.yaml"
        policy.write_text(MESH_POLICY.format(port=backend_port))
        cli = [sys.executable, "-m", "meshlib.cli"]
        if profile is not None:  # every thread profiled, as benchmarks/registry.py does
            cli = [sys.executable, str(PROFILED), str(profile), "-m", "meshlib.cli"]
        cmd = [*cli, "gateway", "serve", "--config", str(config)]
        cmd += ["--port", "http=0", "--port", "https=0"]
        env = {
            **os.environ,
            "MESHLIB_SERVICE": "gateway",
            "MESHLIB_NAMESPACE": "edge",
            "MESHLIB_POLICY": str(policy),
        }
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.log_path = tmpdir / "gateway.log"
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=env,
                cwd=str(tmpdir),
                start_new_session=True,  # a Ctrl-C reaches only us; we stop it
            )
        self.ports: dict[int, int] = {}
        try:
            self._read_ports(deadline=time.monotonic() + 60.0)
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"{exc}; gateway log:\n{self.log()}") from exc

    def _read_ports(self, deadline: float) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        while len(self.ports) < 2:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the gateway did not report its listeners in time")
            ready, _, _ = select.select([fd], [], [], min(remaining, 0.2))
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the gateway exited (status {self.proc.wait()})")
            buf += chunk
            for match in re.finditer(rb"listening: (\d+) -> \w+://[^:]+:(\d+)", buf):
                self.ports[int(match.group(1))] = int(match.group(2))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc.poll() is None else []

    def stop(self) -> None:
        # SIGTERM: a graceful stop, so a profiled gateway writes its stats
        nginx_ctl.stop_process(self.proc, signal.SIGTERM, grace=20.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- measuring ------------------------------------------------------------------------------------


@dataclass
class Target:
    """One way to the backend: a name, a port, TLS or not, and the proxy's pids (none: direct)."""

    name: str
    listener: str  # "plain" or "TLS"
    proxy: str  # "direct", "nginx", "gateway"
    port: int
    context: ssl.SSLContext | None
    pids: list[int]
    latencies_ns: list[int] = field(default_factory=list)
    round_p50_ns: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0
    requests: int = 0
    errors: int = 0
    load: list[dict[str, Any]] = field(default_factory=list)


def _round(path: Target, n: int, record: bool) -> None:
    """A fresh connection, 5 untimed requests (handshake, first-request costs), then n timed."""
    client = inbound_bench.RawClient(path.port, path.context, HOSTNAME)
    try:
        client.connect()
        for _ in range(5):
            client.get()
        cpu0 = nginx_ctl.process_cpu_seconds(path.pids)
        times: list[int] = []
        errors = 0
        for _ in range(n):
            t0 = time.perf_counter_ns()
            status, _ = client.get()
            times.append(time.perf_counter_ns() - t0)
            errors += status != 200
        cpu1 = nginx_ctl.process_cpu_seconds(path.pids)
    finally:
        client.close()
    if record:
        path.latencies_ns.extend(times)
        path.round_p50_ns.append(bench.percentile(times, 50))
        path.cpu_seconds += cpu1 - cpu0
        path.requests += n
        path.errors += errors


def measure_latency(paths: list[Target], rounds: int, n: int, warmup: int) -> None:
    for path in paths:
        _round(path, warmup, record=False)
    for r in range(rounds):
        start = r % len(paths)
        for path in paths[start:] + paths[:start]:
            _round(path, n, record=True)
        bench.log(f"  latency round {r + 1}/{rounds}")


def _wrk(path: Target, seconds: float, connections: int) -> dict[str, Any]:
    # wrk takes whole seconds only
    scheme = "https" if path.context is not None else "http"
    url = f"{scheme}://127.0.0.1:{path.port}/"
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url]
    cmd += ["-H", f"Host: {HOSTNAME}"]
    cpu0 = nginx_ctl.process_cpu_seconds(path.pids)
    t0 = time.monotonic()
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 30, check=False
    ).stdout
    wall = time.monotonic() - t0
    cpu = nginx_ctl.process_cpu_seconds(path.pids) - cpu0
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rps is None or total is None:
        raise RuntimeError(f"could not parse wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "proxy_cpu_s": cpu,
        "proxy_util": cpu / wall,
        "errors": (int(non2xx.group(1)) if non2xx else 0)
        + (sum(int(g) for g in sock_err.groups()) if sock_err else 0),
    }


def measure_load(
    paths: list[Target], rounds: int, seconds: float, warmup: float, connections: int
) -> None:
    for path in paths:
        _wrk(path, warmup, connections)
    for r in range(rounds):
        start = r % len(paths)
        for path in paths[start:] + paths[:start]:
            path.load.append(_wrk(path, seconds, connections))
        bench.log(f"  load round {r + 1}/{rounds}")


# --- results --------------------------------------------------------------------------------------


def summarise(paths: list[Target]) -> list[dict[str, Any]]:
    direct = next(p for p in paths if p.proxy == "direct")
    d99 = bench.percentile(direct.latencies_ns, 99) / 1e3
    rows = []
    for p in paths:
        p50, p99 = (bench.percentile(p.latencies_ns, q) / 1e3 for q in (50, 99))
        # per round, paired with the direct path's p50 of the same round: drift cancels
        paired = [(a - b) / 1e3 for a, b in zip(p.round_p50_ns, direct.round_p50_ns, strict=True)]
        row: dict[str, Any] = {
            "path": p.name,
            "listener": p.listener,
            "proxy": p.proxy,
            "requests": p.requests,
            "errors": p.errors + sum(x["errors"] for x in p.load),
            "p50_us": p50,
            "p99_us": p99,
            "added_p50_us": statistics.median(paired) if p.proxy != "direct" else None,
            "added_p50_round_range_us": [min(paired), max(paired)] if paired else None,
            "added_p99_us": p99 - d99 if p.proxy != "direct" else None,
            "cpu_us_per_request_seq": (
                p.cpu_seconds / p.requests * 1e6 if p.pids and p.requests else None
            ),
        }
        if p.load:
            total = sum(x["requests"] for x in p.load)
            cpu = sum(x["proxy_cpu_s"] for x in p.load)
            row["rps"] = statistics.median(x["rps"] for x in p.load)
            row["rps_range"] = [min(x["rps"] for x in p.load), max(x["rps"] for x in p.load)]
            row["cpu_us_per_request_load"] = cpu / total * 1e6 if p.pids else None
            row["proxy_util"] = (
                statistics.median(x["proxy_util"] for x in p.load) if p.pids else None
            )
        rows.append(row)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or a != a or b != b:
        return None
    return a / b


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gateway over nginx, per listener kind, and the verdict on added p50."""
    out = []
    for listener in ("plain", "TLS"):
        by = {r["proxy"]: r for r in rows if r["listener"] == listener}
        if "nginx" not in by or "gateway" not in by:
            continue
        ng, gw = by["nginx"], by["gateway"]
        ratio = _ratio(gw["added_p50_us"], ng["added_p50_us"])
        out.append(
            {
                "listener": listener,
                "added_p50": _ratio(gw["added_p50_us"], ng["added_p50_us"]),
                "added_p99": _ratio(gw["added_p99_us"], ng["added_p99_us"]),
                "rps": _ratio(gw.get("rps"), ng.get("rps")),
                "cpu_load": _ratio(
                    gw.get("cpu_us_per_request_load"), ng.get("cpu_us_per_request_load")
                ),
                "cpu_seq": _ratio(gw["cpu_us_per_request_seq"], ng["cpu_us_per_request_seq"]),
                "verdict": "-" if ratio is None else ("PASS" if ratio <= TARGET_RATIO else "FAIL"),
            }
        )
    return out


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def render_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [
        f"Command: `{results['command']}` — {results['date']}",
        "",
        f"Machine: {m['cpu_model']}, {m['nproc']} CPUs; proxy pinned to CPU {m['proxy_cpus']}, "
        f"load generator, wrk and backend to CPU {m['load_cpus']}; load average "
        f"{m['loadavg_at_start'][0]:.2f} at start, {m['loadavg_at_end'][0]:.2f} at end. "
        f"{m['python']}, {m['nginx']}, {m['openssl']}, wrk: {m['wrk']}.",
        "",
        f"#### Latency and CPU per request ({s['rounds']} interleaved rounds × {s['requests']} "
        f"sequential keep-alive requests per path, after {s['warmup']} warm-up); throughput "
        f"(wrk -t1 -c{s['connections']}, {s['load_rounds']} × {s['load_seconds']:g} s per path)",
        "",
        "| path | p50 µs | p99 µs | added p50 µs (round range) | added p99 µs "
        "| proxy CPU µs/req (sequential) | req/s (range) | proxy CPU µs/req (load) "
        "| proxy core util (load) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    f = bench.fmt
    for r in results["rows"]:
        rng = r["added_p50_round_range_us"]
        added = (
            "-"
            if r["added_p50_us"] is None
            else f"{f(r['added_p50_us'])} ({f(rng[0])}…{f(rng[1])})"
        )
        rps = "skipped"
        if "rps" in r:
            rps = f"{f(r['rps'], 0)} ({f(r['rps_range'][0], 0)}–{f(r['rps_range'][1], 0)})"
        util = r.get("proxy_util")
        lines.append(
            f"| {r['path']} | {f(r['p50_us'])} | {f(r['p99_us'])} | {added} "
            f"| {f(r['added_p99_us'])} | {f(r['cpu_us_per_request_seq'])} | {rps} "
            f"| {f(r.get('cpu_us_per_request_load'))} "
            f"| {'-' if util is None else f'{util * 100:.0f}%'} |"
        )
    lines += [
        "",
        "#### Gateway / nginx",
        "",
        "| listener | added p50 | added p99 | req/s | CPU/req (load) | CPU/req (sequential) "
        f"| verdict (added p50 ≤ {TARGET_RATIO:g}× nginx's) |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for c in results["compare"]:
        lines.append(
            f"| {c['listener']} | {_x(c['added_p50'])} | {_x(c['added_p99'])} | {_x(c['rps'])} "
            f"| {_x(c['cpu_load'])} | {_x(c['cpu_seq'])} | {c['verdict']} |"
        )
    if not results["compare"]:
        lines.append("| - | nginx not found: skipped | | | | | - |")
    errors = sum(r["errors"] for r in results["rows"])
    lines += ["", f"Errors or non-200 answers: {errors}."]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: a smoke run")
    parser.add_argument("--rounds", type=int, help="latency rounds (default 20)")
    parser.add_argument("--requests", type=int, help="requests per path per round (default 250)")
    parser.add_argument("--load-rounds", type=int, help="wrk rounds per path (default 3; 0: none)")
    parser.add_argument("--load-seconds", type=float, help="seconds per wrk run (default 3)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--no-nginx", action="store_true", help="leave the nginx paths out")
    parser.add_argument("--profile", type=Path, help="run the gateway under cProfile: OUT prefix")
    parser.add_argument("--json", type=Path, help="write every number here")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    quick = args.quick
    settings = {
        "rounds": args.rounds or (2 if quick else 20),
        "requests": args.requests or (20 if quick else 250),
        "warmup": 20 if quick else 500,
        "load_rounds": (1 if quick else 3) if args.load_rounds is None else args.load_rounds,
        "load_seconds": args.load_seconds or (1.0 if quick else 3.0),
        "load_warmup": 1.0,
        "connections": args.connections,
    }
    # (the proxy's core, the load generator's and backend's cores); one core: both share it
    proxy_cpus, load_cpus = registry_bench.split_cores()
    binary = None if args.no_nginx else nginx_ctl.find_nginx()
    wrk = shutil.which("wrk")
    machine = bench.machine_info()
    machine.update(
        proxy_cpus=sorted(proxy_cpus),
        load_cpus=sorted(load_cpus),
        openssl=ssl.OPENSSL_VERSION,
        wrk=(
            subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False).stdout.split(
                "\n", 1
            )[0]
            if wrk
            else "not found"
        ),
    )
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, load_cpus)  # restored below: a test calling main() keeps its cores
    try:
        with contextlib.ExitStack() as stack, bench.sigterm_as_interrupt():
            tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="meshlib-gw-")))
            ca, cert, key = make_certificate(tmpdir)
            client_tls = ssl.create_default_context(cafile=str(ca))
            (backend,) = bench.start_servers([(0.0, 200)], stack, tmpdir)
            paths = [Target("direct", "plain", "direct", backend.port, None, [])]
            if binary is not None:
                proxy = nginx_ctl.Nginx(backend.port, binary, tls=(cert, key)).start()
                stack.callback(proxy.stop)
                pin(proxy.pids(), proxy_cpus)
                paths.append(
                    Target("nginx (plain)", "plain", "nginx", proxy.port, None, proxy.pids())
                )
                paths.append(
                    Target("nginx (TLS)", "TLS", "nginx", proxy.tls_port, client_tls, proxy.pids())
                )
            else:
                bench.log("nginx not found: its paths are skipped")
            gateway = GatewayProcess(tmpdir, backend.port, cert, key, args.profile)
            stack.callback(gateway.stop)
            pin(gateway.pids(), proxy_cpus)
            gw_pids = gateway.pids()
            paths.append(
                Target("gateway (plain)", "plain", "gateway", gateway.ports[80], None, gw_pids)
            )
            paths.append(
                Target("gateway (TLS)", "TLS", "gateway", gateway.ports[443], client_tls, gw_pids)
            )
            bench.log("latency ...")
            measure_latency(paths, settings["rounds"], settings["requests"], settings["warmup"])
            pin(gateway.pids(), proxy_cpus)  # threads started since inherit, but be sure
            if wrk is not None and settings["load_rounds"] > 0:
                bench.log("load ...")
                measure_load(
                    paths,
                    settings["load_rounds"],
                    settings["load_seconds"],
                    settings["load_warmup"],
                    settings["connections"],
                )
            else:
                bench.log("no wrk or no load rounds: the throughput columns are skipped")
            rows = summarise(paths)
    finally:
        os.sched_setaffinity(0, previous)
    machine["loadavg_at_end"] = os.getloadavg()
    return {
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "settings": settings,
        "rows": rows,
        "compare": compare(rows),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if str(REPO_ROOT) not in sys.path:  # benchmark the checkout, installed or not
        sys.path.insert(0, str(REPO_ROOT))
    shown = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "benchmarks/gateway.py", *shown])
    try:
        results = run(args, command)
    except KeyboardInterrupt:
        bench.log("interrupted: every process started was stopped")
        return 130
    print(render_markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
