"""``meshctl status|tap|top|graph URL``: read running services (their admin app, their metrics).

``status``, ``tap`` and ``top`` read one service's admin app (:mod:`meshlib.observe.admin`);
``graph`` scrapes several services' ``/metrics`` (:mod:`meshlib.observe.graph`). These verbs
talk to live processes over HTTP (httpx) while the others read files.
Every verb prints a readable table or lines by default and the admin app's JSON with
``--json``. Exit status: 0 ok, 1 the admin app could not be reached or answered an error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from meshlib.cli.command import EXIT_INVALID, EXIT_OK, Registrar, Subparsers, UsageError

EXIT_FAILED = EXIT_INVALID  # the admin app could not be reached or answered an error


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="the admin app, e.g. http://127.0.0.1:9901")
    p.add_argument("--json", action="store_true", help="print the admin app's JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")


def _get(args: argparse.Namespace, path: str) -> Any:
    url = args.url.rstrip("/") + path
    response = httpx.get(url, timeout=args.timeout)
    if response.status_code != 200:
        raise _Failed(f"{url}: HTTP {response.status_code}: {response.text.strip()}")
    return response.json()


class _Failed(Exception):
    """The admin app could not be reached or answered an error (exit status 1)."""


def _run(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (_Failed, httpx.HTTPError) as exc:
            print(f"meshctl {args.verb}: {exc}", file=sys.stderr)
            return EXIT_FAILED

    return run


_NUMBER = re.compile(r"^-?[\d.]+%?$")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned text columns, numbers right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        bool(rows) and all(_NUMBER.match(str(row[i])) for row in rows) for i in range(len(headers))
    ]
    lines = []
    for r in cells:
        parts = [
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _when(stamp: float | None) -> str:
    if not stamp:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(stamp))


# --- status ------------------------------------------------------------------------------------


def _add_status(sub: Subparsers) -> None:
    p = sub.add_parser(
        "status",
        help="config version, last (rejected) reload and endpoint health of a running service",
        description="Read /status and /endpoints of a service's admin app.",
    )
    _common(p)
    p.set_defaults(func=_run(_cmd_status))


def _cmd_status(args: argparse.Namespace) -> int:
    status = _get(args, "/status")
    dests = _get(args, "/endpoints")
    if args.json:
        print(json.dumps({"status": status, "endpoints": dests}, indent=2))
        return EXIT_OK
    print(format_status(status, dests))
    return EXIT_OK


def format_status(status: dict[str, Any], dests: dict[str, Any]) -> str:
    snap = status["snapshot"]
    reload = status["reload"]
    lines = [
        f"service:      {status['service']}",
        f"config:       version {snap['version']}  digest {snap['digest'][:12]}  "
        f"files {', '.join(snap['files'])}",
        f"last reload:  {'ok' if reload['ok'] else 'REJECTED'} at {_when(reload['at'])}",
    ]
    rejected = status.get("last_rejected")
    if rejected:
        error = rejected["error"] or {"problems": []}
        lines.append(
            f"last rejected: at {_when(rejected['at'])} "
            f"(kept version {rejected['version']}), {len(error['problems'])} problem(s):"
        )
        lines.extend(f"  {p['text']}" for p in error["problems"])
    access = status.get("access_log")
    lines.append(f"access log:   {access['format'] if access else 'off'}")
    rows = []
    for dest in dests["destinations"]:
        for ep in dest["endpoints"]:
            health = "healthy" if ep["healthy"] else f"ejected {ep['ejected_for_seconds']}s"
            rows.append(
                (
                    dest["destination"],
                    ep["address"],
                    health,
                    ep["ewma_ms"],
                    ep["in_flight"],
                    ep["requests"],
                    dest["breaker"],
                    dest["retry_budget"],
                )
            )
    if rows:
        headers = ("DESTINATION", "ENDPOINT", "HEALTH", "EWMA_MS", "INFLIGHT", "REQS")
        lines += ["", table((*headers, "BREAKER", "BUDGET"), rows)]
    return "\n".join(lines)


# --- tap ---------------------------------------------------------------------------------------


def _add_tap(sub: Subparsers) -> None:
    p = sub.add_parser(
        "tap",
        help="stream recent and live calls of a running service (bounded)",
        description="Stream call events from /tap: the recent ones, then live ones, until "
        "--limit events or --seconds have passed.",
    )
    _common(p)
    p.add_argument("--limit", type=int, default=100, help="stop after N events (default 100)")
    p.add_argument("--seconds", type=float, default=30.0, help="stop after S seconds (30)")
    p.add_argument("--destination", help="only calls to this service")
    p.add_argument("--route", help="only this route")
    p.add_argument("--direction", choices=("inbound", "outbound"))
    p.set_defaults(func=_run(_cmd_tap))


def _cmd_tap(args: argparse.Namespace) -> int:
    from meshlib.observe.events import CallEvent

    params: dict[str, str] = {"limit": str(args.limit), "seconds": str(args.seconds)}
    for key in ("destination", "route", "direction"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    url = args.url.rstrip("/") + "/tap"
    timeout = httpx.Timeout(args.timeout, read=args.seconds + args.timeout)
    with httpx.stream("GET", url, params=params, timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            raise _Failed(f"{url}: HTTP {response.status_code}: {response.text.strip()}")
        for line in response.iter_lines():
            if not line:
                continue
            if args.json:
                print(line)
            else:
                print(CallEvent.from_dict(json.loads(line)).text())
            sys.stdout.flush()
    return EXIT_OK


# --- top ---------------------------------------------------------------------------------------


def _add_top(sub: Subparsers) -> None:
    p = sub.add_parser(
        "top",
        help="per-edge request rate, success rate and p50/p99 latency of a running service",
        description="Read /top: aggregates per (direction, source, destination, route) over "
        "the admin app's sliding window.",
    )
    _common(p)
    p.set_defaults(func=_run(_cmd_top))


def _cmd_top(args: argparse.Namespace) -> int:
    top = _get(args, "/top")
    if args.json:
        print(json.dumps(top, indent=2))
        return EXIT_OK
    print(format_top(top))
    return EXIT_OK


def format_top(top: dict[str, Any]) -> str:
    rows = [
        (
            e["direction"],
            e["source"],
            e["destination"],
            e["route"] or "-",
            e["requests"],
            f"{e['rate']:.2f}",
            f"{e['success_rate'] * 100:.1f}%",
            e["p50_ms"],
            e["p99_ms"],
        )
        for e in top["edges"]
    ]
    if not rows:
        return f"no calls in the last {top['window_seconds']:g}s"
    headers = ("DIRECTION", "SOURCE", "DESTINATION", "ROUTE", "REQS", "RPS", "SUCCESS")
    return table((*headers, "P50_MS", "P99_MS"), rows)


# --- graph -------------------------------------------------------------------------------------


def _add_graph(sub: Subparsers) -> None:
    p = sub.add_parser(
        "graph",
        help="who calls whom, from the metrics of several services",
        description="Scrape each URL's /metrics (mesh_requests_total) and print the service "
        "graph: edges with requests and success rate. Two scrapes --interval seconds apart "
        "give rates; otherwise totals since each process started.",
    )
    p.add_argument("urls", nargs="+", metavar="URL", help="a service's metrics URL")
    p.add_argument("--format", choices=("text", "svg", "html"), default="text")
    p.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    p.add_argument("--interval", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    p.set_defaults(func=_cmd_graph)


def _cmd_graph(args: argparse.Namespace) -> int:
    import time

    from meshlib.observe import graph

    if args.interval < 0 or args.timeout <= 0:
        raise UsageError("--interval must be >= 0 and --timeout > 0")
    try:
        scrapes = graph.scrape(args.urls, args.timeout)
        interval = None
        if args.interval > 0:
            time.sleep(args.interval)
            later = graph.scrape(args.urls, args.timeout)
            scrapes = [graph.delta(a, b) for a, b in zip(scrapes, later, strict=True)]
            interval = args.interval
    except graph.GraphError as exc:
        print(f"meshctl graph: {exc}", file=sys.stderr)
        return EXIT_INVALID
    output = graph.RENDERERS[args.format](graph.build(scrapes, interval))
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(output)
        except OSError as exc:
            print(f"meshctl graph: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
            return EXIT_INVALID
    else:
        sys.stdout.write(output)
    return EXIT_OK


VERBS: tuple[Registrar, ...] = (_add_status, _add_tap, _add_top, _add_graph)
