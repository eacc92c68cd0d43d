"""``meshctl status|tap|top URL``: read a running service's admin app (meshlib.observe.admin).

Kept apart from :mod:`meshlib.cli` because these verbs talk to a live process over HTTP
(httpx) while the others read policy files; :mod:`meshlib.cli` only lists the registrars.
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

EXIT_OK = 0
EXIT_FAILED = 1

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


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


def _add_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _add_tap(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _add_top(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


#: Registered by :mod:`meshlib.cli`.
VERBS: tuple[Registrar, ...] = (_add_status, _add_tap, _add_top)
