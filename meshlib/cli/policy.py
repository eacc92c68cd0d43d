"""``meshctl validate|schema|explain``: the verbs that read policy files (no running process).

``validate`` checks files as one policy, ``schema`` prints the JSON Schema of the documents,
``explain`` shows what the mesh would decide for one request (route, split, policy, faults,
and with ``--caller`` the authorization verdict).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import takewhile
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import unquote

from meshlib.cli.command import (
    EXIT_INVALID,
    EXIT_OK,
    Registrar,
    Subparsers,
    UsageError,
    add_output_option,
    print_document,
    print_problems,
)
from meshlib.config.loader import MAX_FILE_BYTES, load_texts, policy_files, read_policy_file
from meshlib.config.model import EffectivePolicy, FaultRule, ServiceDef, Snapshot
from meshlib.config.references import endpointless_services
from meshlib.config.schema import POLICY_FIELDS, json_schema
from meshlib.config.values import format_duration
from meshlib.errors import ConfigError, Problem

if TYPE_CHECKING:
    from meshlib.cli.httproute import Explanation as HTTPExplanation, Request
    from meshlib.policy.routing import Router


# --- validate ----------------------------------------------------------------------------------


def _add_validate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "validate",
        help="check policy files; several files are validated together as one policy",
        description="Parse and check policy files. Prints every problem as "
        "'file:line (document N): field: message' and exits 1 if there is any "
        "(a file with no documents is a problem: write a Mesh document for an empty policy). "
        "FILE may be '-' (stdin) or a directory (its *.yaml and *.yml files, sorted).",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="a policy file, '-' or a directory")
    add_output_option(p)
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        snapshot = _load(args.files)
    except ConfigError as exc:
        if args.output != "text":
            print_document(_validation(args.files, None, exc.problems), args.output)
        return EXIT_INVALID
    warnings = _warnings(snapshot)
    document = _validation(args.files, snapshot, (), warnings)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.output != "text":
        print_document(document, args.output)
        return EXIT_OK
    n = document["documents"]
    summary = ", ".join(f"{count} {kind}" for kind, count in document["kinds"].items())
    noun = "document" if n == 1 else "documents"
    print(f"{snapshot.source}: ok ({n} {noun}{': ' + summary if summary else ''})")
    return EXIT_OK


def _validation(
    names: Sequence[str],
    snapshot: Snapshot | None,
    problems: Sequence[Problem],
    warnings: Sequence[Problem] = (),
) -> dict[str, Any]:
    """``validate -o json|yaml``: the document whose keys docs/cli.md lists (the text output
    is written from it too)."""
    # raw_documents parses the snapshot's texts again at each access: read once
    documents = snapshot.raw_documents if snapshot else ()
    kinds = Counter(str(d.get("kind")) for d in documents)
    return {
        "ok": snapshot is not None,
        "files": list(snapshot.files) if snapshot else list(names),
        "documents": len(documents),
        "kinds": dict(kinds),
        "problems": [_problem(p) for p in problems],
        "warnings": [_problem(w) for w in warnings],
    }


def _warnings(snapshot: Snapshot) -> list[Problem]:
    """The loader's warnings and validate's own, in file order."""
    files = list(snapshot.files)
    found = [*snapshot.warnings, *endpointless_services(snapshot)]
    return sorted(
        found, key=lambda w: (files.index(w.file) if w.file in files else -1, w.document, w.line)
    )


def _problem(p: Problem) -> dict[str, Any]:
    return {
        "file": p.file,
        "line": p.line,
        "column": p.column,
        "document": p.document,
        "field": p.field,
        "message": p.message,
    }


#: The name stdin has in messages, as in ``cat mesh.yaml | meshctl validate -``.
STDIN = "<stdin>"


def _load(names: Sequence[str]) -> Snapshot:
    """Load files, ``-`` and directories as one policy; print every problem to stderr.

    Raises the ConfigError after printing it, so a caller can also put it in a document.
    """
    try:
        return load_texts(_read(names))
    except ConfigError as exc:
        print_problems(exc)
        raise


def _read(names: Sequence[str]) -> list[tuple[str, str | bytes]]:
    """Each input's name and text, a directory expanded to its policy files (sorted by name,
    not recursive, as ``kubectl apply -f DIR``); every unreadable input is one problem."""
    if names.count("-") > 1:
        raise UsageError("'-' (stdin) may be given once")
    sources: list[tuple[str, str | bytes]] = []
    problems: list[Problem] = []
    for name in names:
        try:
            if name == "-":
                sources.append((STDIN, sys.stdin.buffer.read(MAX_FILE_BYTES + 1)))
            elif os.path.isdir(name):
                sources.extend((f, read_policy_file(f)) for f in policy_files([name]))
            else:
                sources.append((name, read_policy_file(name)))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return sources


# --- schema ------------------------------------------------------------------------------------


def _add_schema(sub: Subparsers) -> None:
    p = sub.add_parser(
        "schema",
        help="print the JSON Schema of a policy document (for editors)",
        description="Print the JSON Schema (draft 2020-12) of one policy document, e.g. for "
        "yaml-language-server: '# yaml-language-server: $schema=policy.schema.json'.",
    )
    p.set_defaults(func=_cmd_schema)


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


# --- explain -----------------------------------------------------------------------------------


def _add_explain(sub: Subparsers) -> None:
    p = sub.add_parser(
        "explain",
        help="show the route, split, backends and merged policy a request would get",
        description="Explain what the mesh would do with one request: the route it matches, "
        "the split and backends, and every policy field (named as in the policy file) with the "
        "scope it came from.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="a policy file, '-' or a directory")
    p.add_argument("--service", required=True, help="host the caller uses, e.g. reviews")
    p.add_argument(
        "--path",
        required=True,
        help="request path, e.g. /reviews/1; may carry a query string (/search?q=x)",
    )
    p.add_argument("--method", default="GET")
    p.add_argument(
        "--header", action="append", default=[], metavar="K=V", help="request header (repeat)"
    )
    p.add_argument("--namespace", default="default", help="the caller's namespace")
    p.add_argument(
        "--port",
        type=_port,
        default=80,
        help="the service port the caller dials (default 80): an HTTPRoute parentRef with a "
        "port attaches only to calls on that port",
    )
    p.add_argument(
        "--caller",
        metavar="SPIFFE_ID",
        help="also show the authorization verdict for this caller, e.g. "
        "spiffe://cluster.local/ns/default/sa/ratings ('none': an unauthenticated caller)",
    )
    add_output_option(p)
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--header expects K=V, got {item!r}")
        headers[name.strip().lower()] = value
    try:
        snapshot = _load(args.files)
    except ConfigError:
        return EXIT_INVALID
    # the data plane is only needed by explain
    from meshlib.cli.httproute import Request, explain as explain_http
    from meshlib.policy.routing import Router

    router = Router(snapshot)
    service = router.resolve(args.service, args.namespace)
    if service is None:
        raise UsageError(
            f"{args.service!r} is not a mesh service seen from namespace {args.namespace!r}; "
            f"known: {', '.join(sorted(snapshot.services)) or 'none'}"
        )
    method = args.method.upper()
    # A call matches on the decoded path; the query only feeds HTTPRoute queryParams matches.
    raw_path, _, query = args.path.partition("?")
    request = Request(
        method, unquote(raw_path), query, headers, args.service.lower().rstrip("."), args.port
    )
    http = explain_http(router, service.key, args.namespace, request)
    doc = _explanation(snapshot, router, service.key, request, args.path, http)
    if args.caller is not None:
        doc["authz"] = _authz(router, service, args.caller, method, request.path, headers)
    if args.output == "text":
        _write_explanation(sys.stdout, doc)
    else:
        print_document(doc, args.output)
    return EXIT_OK


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return port


def _authz(
    router: Router,
    service: ServiceDef,
    caller_text: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
) -> dict[str, Any]:
    from meshlib.identity.spiffe import SpiffeID, SpiffeIDError
    from meshlib.policy.authz import authorize, index_for

    caller: SpiffeID | None = None
    if caller_text != "none":
        try:
            caller = SpiffeID.parse(caller_text)
        except SpiffeIDError as exc:
            raise UsageError(f"--caller: {exc}") from None
    index = index_for(router, service)
    verdict = authorize(index, service, caller, method, path, headers)
    return {
        "caller": str(caller) if caller is not None else None,
        "allowed": verdict.allowed,
        "audit_would_deny": verdict.allowed and verdict.denied_by_policy,
        "mode": str(verdict.mode),
        "rule": str(verdict.rule),
        "path": verdict.path,
    }


def _explanation(
    snapshot: Snapshot,
    router: Router,
    key: str,
    request: Request,
    shown_path: str,
    http: HTTPExplanation | None,
) -> dict[str, Any]:
    """What the mesh decides for one request, as the document ``explain -o json`` prints and
    the text is written from (so the two never disagree). ``http``: the HTTPRoute part, when
    HTTPRoutes name the service; the document then has an ``http`` key."""
    if http is not None and http.attached:
        return _http_explanation(snapshot, router, key, request, shown_path, http)
    method, path, headers = request.method, request.path, request.headers
    service = snapshot.services[key]
    match = router.route(service, method, path, headers)
    split_doc: dict[str, Any] | None = None
    backends: list[dict[str, Any]] = []
    if match.split is None:
        split = snapshot.splits.get(key)
        if split is not None:
            split_doc = {"name": f"{split.namespace}/{split.name}", "applies": False}
        backends.append(
            {"service": key, "weight": None, "share": 100.0, "endpoints": _endpoints(snapshot, key)}
        )
    else:
        split = match.split
        split_doc = {"name": f"{split.namespace}/{split.name}", "applies": True}
        total = sum(b.weight for b in split.backends)
        for b in split.backends:
            backends.append(
                {
                    "service": b.service,
                    "weight": b.weight,
                    "share": round(100.0 * b.weight / total, 3) if total else 0.0,
                    "endpoints": _endpoints(snapshot, b.service),
                }
            )
    doc: dict[str, Any] = {
        "request": {"method": method, "path": shown_path, "headers": dict(headers)},
        "service": key,
    }
    if http is not None:
        doc["http"] = http.document  # routes name the service, none attaches to this call
    doc.update(
        route=match.name,
        split=split_doc,
        backends=backends,
        policy=_policy_doc(router.policy(key, match.name)),
        faults=[_fault(f, headers) for f in router.faults(key, match.name)],
        mirrors=_mirrors_doc(router, key),
        authz=None,
    )
    return doc


def _http_explanation(
    snapshot: Snapshot,
    router: Router,
    key: str,
    request: Request,
    shown_path: str,
    http: HTTPExplanation,
) -> dict[str, Any]:
    """:func:`_explanation` for a call HTTPRoutes attach to: the winning rule's label names the
    route, its backendRefs are the backends, and its timeouts sit on top of the merged policy.
    When the mesh answers the request itself (404, a redirect, 500) nothing after routing
    applies: no policy, faults or mirrors."""
    from meshlib.policy.routes import rule_policy

    rule = http.rule
    label = rule.label if rule is not None else None
    backends = [
        {
            "service": b["service"] or b["backend"],
            "weight": b["weight"],
            "share": b["share"],
            "endpoints": _endpoints(snapshot, b["service"]) if b["service"] else [],
        }
        for b in http.document["backends"]
    ]
    # the rule whose policy applies: none when the mesh answers the request itself
    applied = rule if http.forwards else None
    policy, faults, mirrors = [], [], []
    if applied is not None:
        policy = _policy_doc(rule_policy(router.policy(key, label), applied))
        faults = [_fault(f, request.headers) for f in router.faults(key, label)]
        route_name = f"{applied.route.namespace}/{applied.route.name}"
        mirrors = _mirrors_doc(router, key) + [
            {"name": route_name, "mirror": m["service"], "percent": m["percent"]}
            for m in http.document["mirrors"]
            if m["service"] is not None
        ]
    return {
        "request": {
            "method": request.method,
            "path": shown_path,
            "headers": dict(request.headers),
        },
        "service": key,
        "http": http.document,
        "route": label,
        "split": None,
        "backends": backends,
        "policy": policy,
        "faults": faults,
        "mirrors": mirrors,
        "authz": None,
    }


def _policy_doc(policy: EffectivePolicy) -> list[dict[str, Any]]:
    return [
        {
            "field": file_name,
            "value": _value(policy, model_name),
            "source": policy.sources.get(model_name, "default"),
        }
        for file_name, model_name in _POLICY_ROWS
    ]


def _mirrors_doc(router: Router, key: str) -> list[dict[str, Any]]:
    return [
        {"name": f"{m.namespace}/{m.name}", "mirror": m.mirror, "percent": m.percent}
        for m in router.mirrors(key)
    ]


def _endpoints(snapshot: Snapshot, key: str) -> list[dict[str, Any]]:
    svc = snapshot.services.get(key)
    if svc is None:
        return []
    return [
        {"address": e.address, "weight": e.weight, "labels": dict(sorted(e.labels.items()))}
        for e in svc.endpoints
    ]


def _policy_rows() -> tuple[tuple[str, str], ...]:
    """(the name in the policy file, the EffectivePolicy field it shows), in schema order.

    Several file fields setting one model field (rateLimit.requestsPerSecond and .burst both
    make ``rate_limit``) are one row named by their common prefix (``rateLimit``).
    """
    by_model: dict[str, list[str]] = {}
    for pf in POLICY_FIELDS:
        by_model.setdefault(pf.model_name, []).append(pf.yaml_path)
    rows = []
    for model_name, yaml_paths in by_model.items():
        shown_as = yaml_paths[0]
        if len(yaml_paths) > 1:
            parts = zip(*(p.split(".") for p in yaml_paths), strict=False)  # a prefix
            shown_as = ".".join(t[0] for t in takewhile(lambda t: len(set(t)) == 1, parts))
        rows.append((shown_as, model_name))
    return tuple(rows)


_POLICY_ROWS = _policy_rows()
_DURATION_FIELDS = {
    pf.model_name for pf in POLICY_FIELDS if pf.convert in ("duration", "hedge_delay")
}


def _value(policy: EffectivePolicy, name: str) -> str:
    value: Any = policy
    for part in name.split("."):
        value = getattr(value, part)
    return _format(name, value)


def _format(name: str, value: Any) -> str:
    if value is None:
        return {"timeout": "none", "hedging.delay": "p95", "rate_limit": "none"}.get(name, "none")
    if isinstance(value, bool):  # as the policy file writes it
        return "true" if value else "false"
    if name in _DURATION_FIELDS and isinstance(value, float):
        return format_duration(value)
    if isinstance(value, frozenset):
        return ",".join(sorted(value)) or "(never-sent failures only)"
    if hasattr(value, "requests_per_second"):
        return f"{value.requests_per_second:g}/s burst {value.burst}"
    if hasattr(value, "value"):  # enums
        return str(value.value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _fault(fault: FaultRule, headers: Mapping[str, str]) -> dict[str, Any]:
    return {
        "name": f"{fault.namespace}/{fault.name}",
        "delay": None
        if fault.delay is None
        else {"fixed": format_duration(fault.delay.fixed), "percent": fault.delay.percent},
        "abort": None
        if fault.abort is None
        else {"status": fault.abort.status, "percent": fault.abort.percent},
        "headers": dict(fault.headers),
        "matches_request": all(headers.get(k) == v for k, v in fault.headers.items()),
    }


# --- explain: the text -------------------------------------------------------------------------


def _write_explanation(out: TextIO, doc: Mapping[str, Any]) -> None:
    write = out.write
    request = doc["request"]
    extra = "".join(f" {k}={v}" for k, v in request["headers"].items())
    write(f"request:  {request['method']} {request['path']}{extra}\n")
    write(f"service:  {doc['service']}\n")
    http = doc.get("http")
    if http is not None:
        from meshlib.cli.httproute import write as write_http

        write_http(out, http, [b["endpoints"] for b in doc["backends"]])
        if http["attached"]:
            _write_http_tail(out, doc)
            return
    write(f"route:    {doc['route'] or '(none: no named route matched)'}\n")
    split = doc["split"]
    if split is None:
        write("split:    (none)\n")
    elif not split["applies"]:
        write(f"split:    {split['name']} does not apply (request matches none of its matches)\n")
    else:
        write(f"split:    {split['name']}\n")
    for b in doc["backends"]:
        if b["weight"] is None:
            write(f"backend:  {b['service']} (100%)\n")
        else:
            write(f"backend:  {b['service']}  weight {b['weight']}  {b['share']:.1f}%\n")
        if not b["endpoints"]:
            write("            (no static endpoints)\n")
        for e in b["endpoints"]:
            labels = "".join(f" {k}={v}" for k, v in e["labels"].items())
            write(f"            {e['address']}  weight {e['weight']}{labels}\n")
    _write_policy(out, doc)


def _write_http_tail(out: TextIO, doc: Mapping[str, Any]) -> None:
    """After the HTTPRoute lines: the route label, then what applies to a forwarded request."""
    write = out.write
    label = doc["route"]
    write(f"route:    {label} (the label for policy, faults and metrics)\n" if label else "")
    if not doc["policy"]:
        write("policy:   (none: the mesh answers this request itself)\n")
        _write_authz(out, doc)
        return
    _write_policy(out, doc)


def _write_policy(out: TextIO, doc: Mapping[str, Any]) -> None:
    write = out.write
    write("policy:\n")
    rows = doc["policy"]
    field_width = max(len(r["field"]) for r in rows)
    value_width = max(len(r["value"]) for r in rows)
    for r in rows:
        write(f"  {r['field']:<{field_width}}  {r['value']:<{value_width}}  {r['source']}\n")
    write("faults:\n" if doc["faults"] else "faults:   (none)\n")
    for fault in doc["faults"]:
        write(f"  {fault['name']}: {_fault_text(fault)}\n")
    write("mirrors:\n" if doc["mirrors"] else "mirrors:  (none)\n")
    for m in doc["mirrors"]:
        write(f"  {m['name']}: {m['percent']:g}% copied to {m['mirror']}\n")
    _write_authz(out, doc)


def _write_authz(out: TextIO, doc: Mapping[str, Any]) -> None:
    write = out.write
    authz = doc["authz"]
    if authz is not None:
        answer = "allow" if authz["allowed"] else "deny"
        if authz["audit_would_deny"]:
            answer = "allow (audit: would deny)"
        write(f"caller:   {authz['caller'] or '(unauthenticated)'}\n")
        write(f"authz:    {answer}  [accessControl: {authz['mode']}]\n")
        write(f"  by:     {authz['rule']}\n")
        write(f"  path:   {authz['path'] if authz['path'] is not None else '(refused)'}\n")


def _fault_text(fault: Mapping[str, Any]) -> str:
    parts = []
    if fault["delay"] is not None:
        parts.append(f"delay {fault['delay']['fixed']} on {fault['delay']['percent']:g}%")
    if fault["abort"] is not None:
        parts.append(f"abort {fault['abort']['status']} on {fault['abort']['percent']:g}%")
    text = ", ".join(parts)
    if fault["headers"]:
        cond = " ".join(f"{k}={v}" for k, v in fault["headers"].items())
        ok = "matches" if fault["matches_request"] else "does not match"
        text += f" when {cond} ({ok} this request)"
    return text


VERBS: tuple[Registrar, ...] = (_add_validate, _add_schema, _add_explain)
