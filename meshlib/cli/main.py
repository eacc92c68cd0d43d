"""``meshctl``: a thin command line over the library (validate, schema, explain).

Each verb is one ``_add_<verb>`` function that registers its sub-parser and one ``_cmd_<verb>``
that runs it; adding ``ca``, ``registry``, ``apply``, ``get`` or ``graph`` means adding a pair
and listing the registrar in ``_VERBS``. Exit status: 0 ok, 1 invalid configuration (or a
failed command), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from meshlib.cli.observe import VERBS as OBSERVE_VERBS
from meshlib.config.loader import load_files
from meshlib.config.model import EffectivePolicy, FaultRule, ServiceDef, Snapshot
from meshlib.config.schema import POLICY_FIELDS, json_schema
from meshlib.config.values import format_duration, parse_duration
from meshlib.errors import ConfigError

if TYPE_CHECKING:
    from meshlib.policy.routing import Router

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


class _UsageError(Exception):
    """A problem with the command line rather than with the policy (exit status 2)."""


# --- validate ----------------------------------------------------------------------------------


def _add_validate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _add_schema(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _add_explain(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
            raise _UsageError(f"--header expects K=V, got {item!r}")
        headers[name.strip().lower()] = value
    snapshot = _load(args.files)
    if snapshot is None:
        return EXIT_INVALID
    from meshlib.policy.routing import Router  # the data plane is only needed by explain

    router = Router(snapshot)
    service = router.resolve(args.service, args.namespace)
    if service is None:
        raise _UsageError(
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
            raise _UsageError(f"--caller: {exc}") from None
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


# --- ca ----------------------------------------------------------------------------------------


def _add_ca(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ca",
        help="the built-in certificate authority: roots, SVIDs, bundles, revocation",
        description="A small CA for workload identity (SPIFFE X.509 SVIDs). See docs/security.md.",
    )
    ca = p.add_subparsers(dest="ca_verb", metavar="CA_VERB", required=True)
    init = ca.add_parser("init", help="create a root CA (EC P-256, 10 years) in DIR")
    init.add_argument(
        "--dir", required=True, help="writes DIR/ca.pem, DIR/ca-key.pem (0600), DIR/bundle.pem"
    )
    init.add_argument("--trust-domain", default=None, help="default: cluster.local")
    init.add_argument("--force", action="store_true", help="replace an existing root key")
    init.set_defaults(func=_cmd_ca_init)
    issue = ca.add_parser("issue", help="issue an X.509 SVID for a namespace/service account")
    issue.add_argument("--dir", required=True, help="the CA directory (from 'ca init')")
    issue.add_argument("--namespace", required=True)
    issue.add_argument("--service-account", required=True)
    issue.add_argument(
        "--out",
        required=True,
        help="writes cert.pem, key.pem (0600), bundle.pem (DIR's) and crl.pem (if DIR has one)",
    )
    issue.add_argument("--ttl", default="24h", help="certificate lifetime, e.g. 24h, 90m")
    issue.set_defaults(func=_cmd_ca_issue)
    inspect = ca.add_parser("inspect", help="print subject, SPIFFE ID, validity and issuer")
    inspect.add_argument("file", metavar="FILE", help="a PEM file of one or more certificates")
    inspect.add_argument("--bundle", help="also verify FILE as an SVID chain against these roots")
    inspect.set_defaults(func=_cmd_ca_inspect)
    rotate = ca.add_parser(
        "rotate", help="make a new root, keep the old one, publish bundle {old, new}"
    )
    rotate.add_argument("--dir", required=True, help="the CA directory")
    rotate.set_defaults(func=_cmd_ca_rotate)
    bundle = ca.add_parser("bundle", help="write the published trust bundle (with its sequence)")
    bundle.add_argument("--dir", required=True, help="the CA directory")
    bundle.add_argument("--out", required=True, help="the bundle file to write")
    bundle.add_argument(
        "--drop-old",
        action="store_true",
        help="publish the bundle without the previous root (next sequence) first",
    )
    bundle.add_argument(
        "--force",
        action="store_true",
        help="with --drop-old: even if leaves issued by the previous root are still unexpired",
    )
    bundle.set_defaults(func=_cmd_ca_bundle)
    revoke = ca.add_parser("revoke", help="revoke leaf certificates: re-sign DIR/crl.pem")
    revoke.add_argument("--dir", required=True, help="the CA directory")
    revoke.add_argument(
        "files",
        metavar="CERTFILE",
        nargs="*",
        help="certificates to revoke; none: just re-sign the CRLs (before their nextUpdate)",
    )
    revoke.set_defaults(func=_cmd_ca_revoke)


def _cmd_ca_init(args: argparse.Namespace) -> int:
    from meshlib.identity import DEFAULT_TRUST_DOMAIN, IdentityError
    from meshlib.identity.cadir import CADirectory

    cadir = CADirectory(args.dir)
    try:
        ca = cadir.init(args.trust_domain or DEFAULT_TRUST_DOMAIN, force=args.force)
    except IdentityError as exc:
        print(f"meshctl ca init: {exc.reason}", file=sys.stderr)
        return EXIT_INVALID
    out = cadir.path
    print(f"{out}/ca.pem: root CA for spiffe://{ca.trust_domain}, key in {out}/ca-key.pem")
    return EXIT_OK


def _cmd_ca_issue(args: argparse.Namespace) -> int:
    import datetime as dt

    from meshlib.identity import IdentityError, SpiffeID
    from meshlib.identity.cadir import CADirectory

    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        raise _UsageError(f"--ttl: {exc}") from None
    try:
        cadir = CADirectory(args.dir)
        td = cadir.current().trust_domain
        spiffe_id = SpiffeID.for_workload(td, args.namespace, args.service_account)
        svid = cadir.issue(spiffe_id, out=args.out, ttl=dt.timedelta(seconds=ttl))
    except IdentityError as exc:
        print(f"meshctl ca issue: {exc.reason}", file=sys.stderr)
        return EXIT_INVALID
    until = svid.certificate.not_valid_after_utc.isoformat()
    print(f"{args.out}/cert.pem: {spiffe_id} valid until {until}")
    return EXIT_OK


def _cmd_ca_inspect(args: argparse.Namespace) -> int:
    from meshlib.identity import IdentityError, load_certificates, verify_svid
    from meshlib.identity.svid import describe_certificate

    try:
        certs = load_certificates(args.file)
        for index, cert in enumerate(certs):
            if len(certs) > 1:
                print(f"certificate {index + 1} of {len(certs)}:")
            for label, value in describe_certificate(cert):
                print(f"  {label + ':':<12} {value}")
        if args.bundle:
            spiffe_id = verify_svid(certs, load_certificates(args.bundle))
            print(f"verified:    {spiffe_id} chains to {args.bundle}")
    except IdentityError as exc:
        print(f"meshctl ca inspect: {exc.reason}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def _cmd_ca_rotate(args: argparse.Namespace) -> int:
    from meshlib.identity import IdentityError
    from meshlib.identity.bundle import root_label
    from meshlib.identity.cadir import CADirectory

    try:
        new, bundle = CADirectory(args.dir).rotate()
    except IdentityError as exc:
        print(f"meshctl ca rotate: {exc.reason}", file=sys.stderr)
        return EXIT_INVALID
    print(f"new root: {root_label(new.certificate)} (the previous one kept for the overlap)")
    print(f"{args.dir}/bundle.pem: {len(bundle.roots)} roots, sequence {bundle.sequence}")
    return EXIT_OK


def _cmd_ca_bundle(args: argparse.Namespace) -> int:
    from meshlib.identity import IdentityError
    from meshlib.identity.cadir import CADirectory

    if args.force and not args.drop_old:
        raise _UsageError("--force only applies with --drop-old")
    try:
        bundle = CADirectory(args.dir).export_bundle(
            args.out, drop_old=args.drop_old, force=args.force
        )
    except IdentityError as exc:
        print(f"meshctl ca bundle: {exc.reason}", file=sys.stderr)
        return EXIT_INVALID
    print(f"{args.out}: {len(bundle.roots)} root(s), sequence {bundle.sequence}")
    return EXIT_OK


def _cmd_ca_revoke(args: argparse.Namespace) -> int:
    from meshlib.identity import IdentityError
    from meshlib.identity.cadir import CADirectory

    try:
        revoked = CADirectory(args.dir).revoke(args.files)
    except IdentityError as exc:
        print(f"meshctl ca revoke: {exc.reason}", file=sys.stderr)
        return EXIT_INVALID
    for serial, root in revoked:
        print(f"revoked serial {serial:x} (issued by {root})")
    print(f"{args.dir}/crl.pem: re-signed; copy it into each SVID directory")
    return EXIT_OK


# --- graph -------------------------------------------------------------------------------------


def _add_graph(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        raise _UsageError("--interval must be >= 0 and --timeout > 0")
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


# --- entry point -------------------------------------------------------------------------------

_VERBS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_validate,
    _add_schema,
    _add_explain,
    _add_ca,
    *OBSERVE_VERBS,  # status, tap, top (meshlib.cli.observe)
    _add_graph,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshctl", description="meshlib command line: validate and explain mesh policy."
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for add in _VERBS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler = args.func
    try:
        return handler(args)
    except _UsageError as exc:
        print(f"meshctl {args.verb}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `meshctl schema | head`
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
