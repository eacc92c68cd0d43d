"""``meshctl status|tap|top|graph URL``: read running services (their admin app, their metrics).

``status``, ``tap`` and ``top`` read one service's admin app (:mod:`meshlib.observe.admin`);
``graph`` scrapes several services' ``/metrics`` (:mod:`meshlib.observe.graph`). These verbs
talk to live processes over HTTP (httpx) while the others read files. A URL may omit its
scheme (``127.0.0.1:9901`` means ``http://127.0.0.1:9901``).
Every verb prints a readable table or lines by default and ``-o json|yaml`` prints the data
(the shapes are in docs/cli.md, pinned by tests/observe/test_admin.py and test_graph.py).
Exit status: 0 ok, 1 a service could not be reached or answered an error (one line on stderr
naming the URL).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx

from meshlib.cli.command import (
    EXIT_OK,
    CommandFailed,
    Registrar,
    Subparsers,
    UsageError,
    add_output_option,
    format_document,
    positive_seconds,
    print_document,
)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "url", metavar="URL", help="the admin app, e.g. http://127.0.0.1:9901 or 127.0.0.1:9901"
    )
    add_output_option(p, json_alias=True)
    p.add_argument("--timeout", type=positive_seconds, default=5.0, help="seconds (default 5)")


def base_url(url: str) -> str:
    """``url`` with ``http://`` when it has no scheme, without a trailing slash."""
    return (url if "://" in url else f"http://{url}").rstrip("/")


def _get(args: argparse.Namespace, path: str) -> Any:
    from meshlib.observe.graph import failure

    url = base_url(args.url) + path
    try:
        response = httpx.get(url, timeout=args.timeout)
    except httpx.HTTPError as exc:
        raise CommandFailed(f"{url}: {failure(exc, args.timeout)}") from exc
    except (httpx.InvalidURL, ValueError) as exc:  # InvalidURL is not a ValueError
        raise CommandFailed(f"{args.url}: not a URL ({exc})") from exc
    if response.status_code != 200:
        raise _refused(url, response)
    try:
        return response.json()
    except ValueError:
        raise _not_admin(url) from None


def _refused(url: str, response: httpx.Response) -> CommandFailed:
    return CommandFailed(f"{url}: HTTP {response.status_code}: {_first_line(response.text)}")


def _not_admin(url: str) -> CommandFailed:
    return CommandFailed(f"{url}: not an admin app (the answer is not JSON)")


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "(empty body)"


_NUMBER = re.compile(r"^-?[\d.]+(%|ms|s|/s| \w+)?$")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned text columns, numbers (with or without their unit) right-aligned."""
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
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(stamp)) if stamp else "never"


# --- status ------------------------------------------------------------------------------------


def _add_status(sub: Subparsers) -> None:
    p = sub.add_parser(
        "status",
        help="config version, last (rejected) reload and endpoint health of a running service",
        description="Read /status and /endpoints of a service's admin app.",
    )
    _common(p)
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    status = _get(args, "/status")
    dests = _get(args, "/endpoints")
    if args.output != "text":
        print_document({"status": status, "endpoints": dests}, args.output)
        return EXIT_OK
    print(format_status(status, dests))
    return EXIT_OK


#: What the endpoint table's columns mean, printed under it.
STATUS_NOTE = (
    "LATENCY: peak-EWMA latency of the endpoint, which the balancer compares (decays when idle)\n"
    "INFLIGHT, REQUESTS: attempts on the endpoint now, and since the process started\n"
    "RETRY_BUDGET: retries the destination may send now (budget ratio and floor)"
)


def format_status(status: dict[str, Any], dests: dict[str, Any]) -> str:
    snap = status["snapshot"]
    reload = status["reload"]
    if not reload["at"]:
        last = "never (the policy in force was loaded at start)"
    else:
        last = f"{'ok' if reload['ok'] else 'REJECTED'} at {_when(reload['at'])}"
    lines = [
        f"service:      {status['service']}",
        f"config:       version {snap['version']}  digest {snap['digest'][:12]}  "
        f"files {', '.join(snap['files']) or '(text)'}",
        f"last reload:  {last}",
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
    link = status.get("registry")
    if link:
        stale = link.get("staleness_seconds")
        state = "up" if link["up"] else f"AWAY for {stale or 0:.1f}s (using the last known state)"
        policy = f"policy version {link['policy_version']}"
        if link.get("policy_rejected") is not None:
            policy += f", REJECTED version {link['policy_rejected']}: {link['policy_error']}"
        urls = link.get("urls") or [link["url"]]
        # With several registries, which one is in use now ("2 of 3").
        which = f" ({urls.index(link['url']) + 1} of {len(urls)})" if len(urls) > 1 else ""
        lines.append(f"registry:     {link['url']}{which} {state}  epoch {link['epoch'] or '-'}")
        lines.append(f"              {policy}; watching {len(link['services'])} service(s)")
    rows = []
    for dest in dests["destinations"]:
        budget = dest["retry_budget"]
        for ep in dest["endpoints"]:
            health = "healthy" if ep["healthy"] else f"ejected {ep['ejected_for_seconds']:g}s"
            rows.append(
                (
                    dest["destination"],
                    ep["address"],
                    health,
                    f"{ep['ewma_ms']:.3f}ms",
                    ep["in_flight"],
                    ep["requests"],
                    dest["breaker"],
                    f"{budget:g} retr{'y' if budget == 1 else 'ies'}",
                )
            )
    if rows:
        headers = ("DESTINATION", "ENDPOINT", "HEALTH", "LATENCY", "INFLIGHT", "REQUESTS")
        lines += ["", table((*headers, "BREAKER", "RETRY_BUDGET"), rows), "", STATUS_NOTE]
    else:
        lines.append("endpoints:    none called yet")
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
    p.set_defaults(func=_cmd_tap)


def _cmd_tap(args: argparse.Namespace) -> int:
    from meshlib.observe.events import CallEvent
    from meshlib.observe.graph import failure

    params: dict[str, str] = {"limit": str(args.limit), "seconds": str(args.seconds)}
    for key in ("destination", "route", "direction"):
        if getattr(args, key):
            params[key] = getattr(args, key)
    url = base_url(args.url) + "/tap"
    timeout = httpx.Timeout(args.timeout, read=args.seconds + args.timeout)
    try:
        with httpx.stream("GET", url, params=params, timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                raise CommandFailed(
                    f"{url}: HTTP {response.status_code}: {_first_line(response.text)}"
                )
            for line in response.iter_lines():
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise CommandFailed(
                        f"{url}: not an admin app (the answer is not JSON)"
                    ) from None
                if args.output == "json":
                    print(line)  # NDJSON: one event per line, as the admin app sends it
                elif args.output == "yaml":
                    print("---\n" + format_document(event, "yaml"))
                else:
                    print(CallEvent.from_dict(event).text())
                sys.stdout.flush()
    except httpx.HTTPError as exc:
        raise CommandFailed(f"{url}: {failure(exc, args.timeout)}") from exc
    except httpx.InvalidURL as exc:
        raise CommandFailed(f"{args.url}: not a URL ({exc})") from exc
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
    p.set_defaults(func=_cmd_top)


def _cmd_top(args: argparse.Namespace) -> int:
    top = _get(args, "/top")
    if args.output != "text":
        print_document(top, args.output)
        return EXIT_OK
    print(format_top(top))
    return EXIT_OK


def format_top(top: dict[str, Any]) -> str:
    window = top["window_seconds"]
    rows = [
        (
            e["direction"],
            e["source"],
            e["destination"],
            e["route"] or "-",
            e["requests"],
            f"{e['rate']:.2f}/s",
            f"{e['success_rate'] * 100:.1f}%",
            f"{e['p50_ms']:.3f}ms",
            f"{e['p99_ms']:.3f}ms",
        )
        for e in top["edges"]
    ]
    if not rows:
        return f"no calls in the last {window:g}s"
    headers = ("DIRECTION", "SOURCE", "DESTINATION", "ROUTE", "REQUESTS", "RATE", "SUCCESS")
    note = (
        f"over the last {window:g}s; SUCCESS: not refused or failed by the mesh and not 5xx; "
        "P50, P99: latency percentiles"
    )
    return table((*headers, "P50", "P99"), rows) + "\n\n" + note


# --- graph -------------------------------------------------------------------------------------


def _add_graph(sub: Subparsers) -> None:
    p = sub.add_parser(
        "graph",
        help="who calls whom, from the metrics of several services",
        description="Scrape each URL's metrics (mesh_requests_total) and print the service "
        "graph: edges with requests and success rate. A URL is a service's metrics URL or its "
        "base URL (/metrics is implied; redirects are followed). Two scrapes --interval "
        "seconds apart give rates; otherwise totals since each process started.",
    )
    p.add_argument(
        "urls", nargs="+", metavar="URL", help="a service's metrics URL or base URL (host:port)"
    )
    p.add_argument("--format", choices=("text", "svg", "html"), default="text")
    add_output_option(p, json_alias=True)
    p.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    p.add_argument("--interval", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--timeout", type=positive_seconds, default=5.0, metavar="SECONDS")
    p.set_defaults(func=_cmd_graph)


def _cmd_graph(args: argparse.Namespace) -> int:
    from meshlib.observe import graph

    if args.interval < 0:
        raise UsageError("--interval must be >= 0")
    if args.format != "text" and args.output != "text":
        raise UsageError(f"-o {args.output} prints the text format's data; drop --format")
    try:
        scrapes = graph.scrape(args.urls, args.timeout)
        interval = None
        if args.interval > 0:
            time.sleep(args.interval)
            later = graph.scrape(args.urls, args.timeout)
            scrapes = [graph.delta(a, b) for a, b in zip(scrapes, later, strict=True)]
            interval = args.interval
    except graph.GraphError as exc:
        raise CommandFailed(str(exc)) from exc
    built = graph.build(scrapes, interval)
    if args.output != "text":
        output = format_document(graph.as_dict(built), args.output) + "\n"
    else:
        output = graph.RENDERERS[args.format](built)
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(output)
        except OSError as exc:
            raise CommandFailed(f"cannot write {args.out}: {exc.strerror}") from exc
    else:
        sys.stdout.write(output)
    return EXIT_OK


VERBS: tuple[Registrar, ...] = (_add_status, _add_tap, _add_top, _add_graph)
