"""``meshctl validate|schema|explain``: the verbs that read policy files (no running process).

``validate`` checks files as one policy, ``schema`` prints the JSON Schema of the documents,
``explain`` shows what the mesh would decide for one request (route, split, policy, faults,
and with ``--caller`` the authorization verdict).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from meshlib.cli.command import EXIT_INVALID, EXIT_OK, Registrar, Subparsers, UsageError
from meshlib.config.loader import load_files
from meshlib.config.model import EffectivePolicy, FaultRule, ServiceDef, Snapshot
from meshlib.config.schema import POLICY_FIELDS, json_schema
from meshlib.config.values import format_duration
from meshlib.errors import ConfigError

if TYPE_CHECKING:
    from meshlib.policy.routing import Router


# --- validate ----------------------------------------------------------------------------------


def _add_validate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "validate",
        help="check policy files; several files are validated together as one policy",
        description="Parse and check policy files. Prints every problem as "
        "'file:line (document N): field: message' and exits 1 if there is any "
        "(a file with no documents is a problem: write a Mesh document for an empty policy).",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args: argparse.Namespace) -> int:
    snapshot = _load(args.files)
    if snapshot is None:
        return EXIT_INVALID
    for warning in snapshot.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    kinds = Counter(str(doc.get("kind")) for doc in snapshot.raw_documents)
    n = len(snapshot.raw_documents)
    summary = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
    noun = "document" if n == 1 else "documents"
    print(f"{snapshot.source}: ok ({n} {noun}{': ' + summary if summary else ''})")
    return EXIT_OK


def _load(files: Sequence[str]) -> Snapshot | None:
    """Load files as one policy; print every problem to stderr and return None on failure."""
    try:
        return load_files(files)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        n = len(exc.problems)
        if n > 1:  # one problem is its own one-line reason (DESIGN.md §7)
            print(f"{n} problems found", file=sys.stderr)
        return None


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
        "the split and backends, and every policy field with the scope it came from.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--service", required=True, help="host the caller uses, e.g. reviews")
    p.add_argument("--path", required=True, help="request path, e.g. /reviews/1")
    p.add_argument("--method", default="GET")
    p.add_argument(
        "--header", action="append", default=[], metavar="K=V", help="request header (repeat)"
    )
    p.add_argument("--namespace", default="default", help="the caller's namespace")
    p.add_argument(
        "--caller",
        metavar="SPIFFE_ID",
        help="also show the authorization verdict for this caller, e.g. "
        "spiffe://cluster.local/ns/default/sa/ratings ('none': an unauthenticated caller)",
    )
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args: argparse.Namespace) -> int:
    headers: dict[str, str] = {}
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--header expects K=V, got {item!r}")
        headers[name.strip().lower()] = value
    snapshot = _load(args.files)
    if snapshot is None:
        return EXIT_INVALID
    from meshlib.policy.routing import Router  # the data plane is only needed by explain

    router = Router(snapshot)
    service = router.resolve(args.service, args.namespace)
    if service is None:
        raise UsageError(
            f"{args.service!r} is not a mesh service seen from namespace {args.namespace!r}; "
            f"known: {', '.join(sorted(snapshot.services)) or 'none'}"
        )
    _explain(sys.stdout, snapshot, router, service.key, args.method.upper(), args.path, headers)
    if args.caller is not None:
        _explain_authz(sys.stdout, router, service, args.caller, args.method, args.path, headers)
    return EXIT_OK


def _explain_authz(
    out: TextIO,
    router: Router,
    service: ServiceDef,
    caller_text: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
) -> None:
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
    answer = "allow" if verdict.allowed else "deny"
    if verdict.allowed and verdict.denied_by_policy:
        answer = "allow (audit: would deny)"
    out.write(f"caller:   {caller if caller is not None else '(unauthenticated)'}\n")
    out.write(f"authz:    {answer}  [accessControl: {verdict.mode}]\n")
    out.write(f"  by:     {verdict.rule}\n")
    out.write(f"  path:   {verdict.path if verdict.path is not None else '(refused)'}\n")


def _explain(
    out: TextIO,
    snapshot: Snapshot,
    router: Router,
    key: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
) -> None:
    service = snapshot.services[key]
    match = router.route(service, method, path, headers)
    write = out.write
    write(f"request:  {method} {path}" + "".join(f" {k}={v}" for k, v in headers.items()) + "\n")
    write(f"service:  {key}\n")
    write(f"route:    {match.name or '(none: no named route matched)'}\n")
    if match.split is None:
        split = snapshot.splits.get(key)
        if split is not None:
            write(f"split:    {split.name} does not apply (request matches none of its matches)\n")
        else:
            write("split:    (none)\n")
        write(f"backend:  {key} (100%)\n")
        _endpoints(out, snapshot, key)
    else:
        split = match.split
        total = sum(b.weight for b in split.backends)
        write(f"split:    {split.namespace}/{split.name}\n")
        for b in split.backends:
            share = 100.0 * b.weight / total if total else 0.0
            write(f"backend:  {b.service}  weight {b.weight}  {share:.1f}%\n")
            _endpoints(out, snapshot, b.service)
    _policy(out, router.policy(key, match.name))
    faults = router.faults(key, match.name)
    write("faults:\n" if faults else "faults:   (none)\n")
    for fault in faults:
        write(f"  {fault.namespace}/{fault.name}: {_fault(fault, headers)}\n")
    mirrors = router.mirrors(key)
    write("mirrors:\n" if mirrors else "mirrors:  (none)\n")
    for mirror in mirrors:
        write(
            f"  {mirror.namespace}/{mirror.name}: {mirror.percent:g}% copied to {mirror.mirror}\n"
        )


def _endpoints(out: TextIO, snapshot: Snapshot, key: str) -> None:
    svc = snapshot.services.get(key)
    if svc is None or not svc.endpoints:
        out.write("            (no static endpoints)\n")
        return
    for e in svc.endpoints:
        labels = "".join(f" {k}={v}" for k, v in sorted(e.labels.items()))
        out.write(f"            {e.address}  weight {e.weight}{labels}\n")


_DURATION_FIELDS = {
    pf.model_name for pf in POLICY_FIELDS if pf.convert in ("duration", "hedge_delay")
}
_FIELD_NAMES = list(dict.fromkeys(pf.model_name for pf in POLICY_FIELDS))


def _policy(out: TextIO, policy: EffectivePolicy) -> None:
    out.write("policy:\n")
    width = max(len(name) for name in _FIELD_NAMES)
    for name in _FIELD_NAMES:
        value: Any = policy
        for part in name.split("."):
            value = getattr(value, part)
        source = policy.sources.get(name, "default")
        out.write(f"  {name:<{width}}  {_format(name, value):<18}  {source}\n")


def _format(name: str, value: Any) -> str:
    if value is None:
        return {"timeout": "none", "hedging.delay": "p95", "rate_limit": "none"}.get(name, "none")
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


def _fault(fault: FaultRule, headers: Mapping[str, str]) -> str:
    parts = []
    if fault.delay is not None:
        parts.append(f"delay {format_duration(fault.delay.fixed)} on {fault.delay.percent:g}%")
    if fault.abort is not None:
        parts.append(f"abort {fault.abort.status} on {fault.abort.percent:g}%")
    text = ", ".join(parts)
    if fault.headers:
        cond = " ".join(f"{k}={v}" for k, v in fault.headers.items())
        ok = all(headers.get(k) == v for k, v in fault.headers.items())
        text += f" when {cond} ({'matches' if ok else 'does not match'} this request)"
    return text


VERBS: tuple[Registrar, ...] = (_add_validate, _add_schema, _add_explain)
