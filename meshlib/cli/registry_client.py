"""``meshctl apply|get|history|rollback`` and ``meshctl registry status``: the verbs that talk
to a running registry over its HTTPS API (:class:`meshlib.control.client.RegistryClient`).

Every verb takes ``--registry URL[,URL…]`` (or ``MESHLIB_REGISTRY``; several registries over
one store: a registry that cannot be reached is passed over for the next) and ``--svid-dir DIR`` (or
``MESHLIB_SVID_DIR``), the SVID it presents: the admin SVID ``registry init`` writes to
``DIR/admin`` for apply and rollback, any SVID of the trust domain for reads. ``apply``
validates the files with the same loader the registry and the services use before it sends
anything, so a broken file is reported with its own name and lines and never reaches the
registry. Tables by default, ``-o json|yaml`` for scripts (the shapes are in docs/cli.md).
Exit status: 0 ok, 1 a rejected policy or a registry that refused or could not be reached
(one line on stderr), 2 a usage error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from meshlib.cli.command import (
    EXIT_INVALID,
    EXIT_OK,
    CommandFailed,
    Registrar,
    Subparsers,
    UsageError,
    add_output_option,
    positive_seconds,
    print_document,
)
from meshlib.cli.observe import table

if TYPE_CHECKING:
    from meshlib.control.client import RegistryClient
    from meshlib.control.wire import PolicyAnswer, RegistryStatusInfo

__all__ = [
    "REGISTRY_ENV",
    "SVID_DIR_ENV",
    "VERBS",
    "add_connection_options",
    "add_registry_status",
    "connect",
    "joined_policy",
    "svid_dir_of",
]

REGISTRY_ENV = "MESHLIB_REGISTRY"
SVID_DIR_ENV = "MESHLIB_SVID_DIR"
#: The name local validation gives standard input (as ``meshctl validate -``) and the name
#: sent to the registry for it.
STDIN = "<stdin>"
STDIN_SOURCE = "-"
#: Width of the rejection error in the ``get instances`` table (-o json has all of it).
ERROR_WIDTH = 48
DEFAULT_NAMESPACE = "default"


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        metavar="URL[,URL...]",
        help="the registry, e.g. https://127.0.0.1:8700, or several separated by commas "
        f"(tried in turn) (default ${REGISTRY_ENV})",
    )
    p.add_argument(
        "--svid-dir",
        metavar="DIR",
        help=f"the SVID to present, e.g. the registry's DIR/admin (default ${SVID_DIR_ENV})",
    )
    p.add_argument("--timeout", type=positive_seconds, default=5.0, help="seconds (default 5)")


def registry_url(args: argparse.Namespace) -> str:
    """``--registry`` or ``$MESHLIB_REGISTRY``: one URL or several separated by commas, each
    with ``https://`` added when it has no scheme; returned joined by commas."""
    given = args.registry or os.environ.get(REGISTRY_ENV, "")
    if not given.strip():
        raise UsageError(f"no registry: pass --registry URL or set {REGISTRY_ENV}")
    urls = []
    for url in (each.strip() for each in given.split(",")):
        if url and "://" not in url:
            url = f"https://{url}"
        if url and not url.startswith("https://"):
            raise UsageError(f"the registry is served over HTTPS only, got {url!r}")
        urls.append(url.rstrip("/"))  # an empty one is named by the client's check
    return ",".join(urls)


def _svid_dir(args: argparse.Namespace) -> str:
    svid_dir = args.svid_dir or os.environ.get(SVID_DIR_ENV, "")
    if not svid_dir:
        raise UsageError(f"no SVID: pass --svid-dir DIR or set {SVID_DIR_ENV}")
    return str(svid_dir)


@contextmanager
def _registry(args: argparse.Namespace) -> Iterator[RegistryClient]:
    """A client of the registry the options name; every failure of the API becomes one line
    (:class:`CommandFailed`) naming the registry."""
    import httpx

    from meshlib.control.client import (
        PolicyRejected,
        RegistryClient,
        RegistryConflict,
        RegistryError,
        RegistryRefused,
        RegistryUnavailable,
    )
    from meshlib.identity import IdentityError

    url = registry_url(args)
    svid_dir = _svid_dir(args)
    try:
        client = RegistryClient(url, svid_dir=svid_dir, timeout=args.timeout)
    except IdentityError as exc:
        raise CommandFailed(f"--svid-dir {svid_dir}: {exc.reason}") from exc
    except (httpx.InvalidURL, ValueError) as exc:
        raise CommandFailed(f"{url}: not a URL ({exc})") from exc
    try:
        with client:
            yield client
    except RegistryUnavailable as exc:
        if exc.status:  # it answered: 5xx or 429
            said = f"unavailable ({exc.status})"
            raise CommandFailed(f"registry {url} {said}: {exc.message}") from exc
        raise CommandFailed(f"registry {url} unreachable: {exc.message}") from exc
    except RegistryRefused as exc:
        raise CommandFailed(f"registry {url} refused: {exc.message}") from exc
    except RegistryConflict as exc:
        raise CommandFailed(
            f"version conflict: the registry is at version {exc.current}; "
            "re-read it (meshctl get policy) and apply again"
        ) from exc
    except PolicyRejected as exc:
        # Every problem, as the loader formats it; the one-line reason comes last.
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        n = len(exc.problems)
        raise CommandFailed(
            f"registry {url} rejected the policy ({n} problem{'s' if n != 1 else ''})"
        ) from exc
    except RegistryError as exc:
        raise CommandFailed(f"registry {url}: {exc.status or 'error'}: {exc.message}") from exc
    except httpx.InvalidURL as exc:  # raised when the request is built, and no HTTPError
        raise CommandFailed(f"{url}: not a URL ({exc})") from exc


#: The options and the client of every verb that talks to a running registry, for the verb
#: groups outside this module (``meshctl token``): one set of flags, one wording of failures.
add_connection_options = _connection
connect = _registry
svid_dir_of = _svid_dir


def _when(stamp: float | None) -> str:
    """A Unix time as ISO 8601 UTC (``2026-12-06T09:12:03Z``), ``-`` for none."""
    if stamp is None:
        return "-"
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dash(value: object) -> object:
    return "-" if value is None else value


# --- apply -------------------------------------------------------------------------------------


def _add_apply(sub: Subparsers) -> None:
    p = sub.add_parser(
        "apply",
        help="validate policy files and make them the registry's policy (a new version)",
        description="Validate FILEs as one policy (as 'meshctl validate'; nothing is sent when "
        "a file has a problem), then send them to the registry as one text, the documents "
        "joined by '---'. Prints the new version. Needs an admin SVID.",
    )
    p.add_argument(
        "-f",
        "--filename",
        dest="files",
        action="extend",
        nargs="+",
        required=True,
        metavar="FILE",
        help="a policy file, '-' for standard input (repeatable)",
    )
    p.add_argument(
        "--if-match",
        type=int,
        metavar="VERSION",
        help="apply only if the registry is still at VERSION (the version you read)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate and say what would be sent; send nothing"
    )
    _connection(p)
    add_output_option(p)
    p.set_defaults(func=_cmd_apply)


def _read(names: Sequence[str]) -> list[tuple[str, str | bytes]]:
    """Each named input's text; every unreadable one is one problem (ConfigError)."""
    from meshlib.config.loader import MAX_FILE_BYTES, read_policy_file
    from meshlib.errors import ConfigError, Problem

    if names.count("-") > 1:
        raise UsageError("'-' (stdin) may be given once")
    sources: list[tuple[str, str | bytes]] = []
    problems: list[Problem] = []
    for name in names:
        try:
            if name == "-":
                sources.append((STDIN, sys.stdin.buffer.read(MAX_FILE_BYTES + 1)))
            else:
                sources.append((name, read_policy_file(name)))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return sources


def joined_policy(texts: Sequence[str]) -> str:
    """Several policy texts as one: each without its byte order mark (only the start of a
    stream may have one) and ending in a newline, joined by a ``---`` line. An empty document
    this makes (a text that opens with ``---``) is ignored by the loader."""
    parts = [t.removeprefix("\ufeff") for t in texts]
    return "---\n".join(t if t.endswith("\n") else t + "\n" for t in parts)


def _source_name(names: Sequence[str]) -> str:
    """The X-Mesh-Source header: the names joined by '+', printable ASCII only (a header
    cannot carry the rest; '?' stands for it)."""
    joined = "+".join(STDIN_SOURCE if n == "-" else n for n in names)
    return "".join(c if " " <= c <= "~" else "?" for c in joined)


def _cmd_apply(args: argparse.Namespace) -> int:
    from meshlib.config.loader import load_texts
    from meshlib.errors import ConfigError

    try:
        sources = _read(args.files)
        snapshot = load_texts(sources)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        n = len(exc.problems)
        print(f"{n} problem{'s' if n != 1 else ''} found: nothing sent", file=sys.stderr)
        return EXIT_INVALID
    for warning in snapshot.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # load_texts decoded the bytes of stdin; decode them the same way here (they are valid).
    texts = [t if isinstance(t, str) else t.decode("utf-8") for _, t in sources]
    text = joined_policy(texts)
    source = _source_name(args.files)
    if args.dry_run:
        where = args.registry or os.environ.get(REGISTRY_ENV) or "the registry"
        document = {
            "dry_run": True,
            "source": source,
            "bytes": len(text.encode()),
            "documents": len(snapshot.raw_documents),
            "if_match": args.if_match,
        }
        if args.output != "text":
            print_document(document, args.output)
            return EXIT_OK
        fence = "" if args.if_match is None else f" if it is at version {args.if_match}"
        print(
            f"valid: would send {document['documents']} document(s), {document['bytes']} bytes, "
            f"as {source} to {where}{fence}"
        )
        return EXIT_OK
    with _registry(args) as client:
        applied = client.apply(text, if_match=args.if_match, source=source)
    if args.output != "text":
        print_document(
            {"version": applied.version, "digest": applied.digest, "changed": applied.changed},
            args.output,
        )
    elif applied.changed:
        print(f"applied version {applied.version}")
    else:
        print(f"unchanged: version {applied.version}")
    return EXIT_OK


# --- get ---------------------------------------------------------------------------------------


def _add_get(sub: Subparsers) -> None:
    get = sub.add_parser(
        "get",
        help="read the registry: policy, services, endpoints SVC, instances",
        description="Read the registry's current policy, its services, one service's "
        "endpoints or every registered instance (with the policy version it applied or "
        "rejected).",
    )
    verbs = get.add_subparsers(dest="get_verb", metavar="WHAT", required=True)
    policy = verbs.add_parser(
        "policy",
        help="the current policy text (-o json|yaml: with its version, digest, author)",
        description="Print the registry's current policy. Text: the YAML under a comment line "
        "naming its version, so the output can be edited and applied again.",
    )
    policy.set_defaults(func=_cmd_get_policy)
    services = verbs.add_parser(
        "services", help="every service with live instances: how many, its index"
    )
    services.set_defaults(func=_cmd_get_services)
    endpoints = verbs.add_parser(
        "endpoints",
        help="the live instances of one service (SVC is name or name.namespace)",
    )
    endpoints.add_argument(
        "service", metavar="SVC", help=f"name or name.namespace (namespace {DEFAULT_NAMESPACE})"
    )
    endpoints.set_defaults(func=_cmd_get_endpoints)
    instances = verbs.add_parser(
        "instances",
        help="every registered instance, with the policy version it applied or rejected",
    )
    instances.set_defaults(func=_cmd_get_instances)
    for p in (policy, services, endpoints, instances):
        _connection(p)
        add_output_option(p)


def _policy_document(answer: PolicyAnswer) -> dict[str, Any]:
    return {
        "version": answer.version,
        "digest": answer.digest,
        "author": answer.author,
        "created_at": answer.created_at,
        "created": None if answer.created_at is None else _when(answer.created_at),
        "rollback_of": answer.rollback_of,
        "epoch": answer.epoch,
        "authoritative": answer.authoritative,
        "text": answer.text,
    }


def _cmd_get_policy(args: argparse.Namespace) -> int:
    with _registry(args) as client:
        answer = client.policy()
    if args.output != "text":
        print_document(_policy_document(answer), args.output)
        return EXIT_OK
    if not answer.version:
        print("# no policy applied yet (version 0)")
        return EXIT_OK
    made = f"rollback of version {answer.rollback_of}, " if answer.rollback_of else ""
    print(
        f"# version {answer.version} ({answer.digest}), {made}"
        f"applied by {answer.author or '-'} at {_when(answer.created_at)}"
    )
    sys.stdout.write(answer.text if answer.text.endswith("\n") else answer.text + "\n")
    return EXIT_OK


def _cmd_get_services(args: argparse.Namespace) -> int:
    with _registry(args) as client:
        services = client.services()
    if args.output != "text":
        print_document({"services": [s.to_json() for s in services]}, args.output)
    elif not services:
        print("no services registered")
    else:
        rows = [(s.namespace, s.service, s.instances, s.index) for s in services]
        print(table(("NAMESPACE", "SERVICE", "INSTANCES", "INDEX"), rows))
    return EXIT_OK


def split_service(text: str) -> tuple[str, str]:
    """``name`` or ``name.namespace`` as (namespace, name)."""
    name, _, namespace = text.partition(".")
    if not name or (not namespace and text.endswith(".")):
        raise UsageError(f"SVC must be name or name.namespace, got {text!r}")
    return namespace or DEFAULT_NAMESPACE, name


def _labels(labels: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(dict(labels).items())) or "-"


def _cmd_get_endpoints(args: argparse.Namespace) -> int:
    namespace, name = split_service(args.service)
    with _registry(args) as client:
        answer = client.endpoints(namespace, name)
    if args.output != "text":
        print_document(answer.to_json(), args.output)
        return EXIT_OK
    trust = "" if answer.authoritative else " (NOT authoritative: the registry is warming up)"
    print(f"{answer.key}: index {answer.index}{trust}")
    if not answer.endpoints:
        print("no live instances")
        return EXIT_OK
    rows = [
        (e.id, e.address, e.port, _labels(e.labels), _dash(e.metrics_port))
        for e in answer.endpoints
    ]
    print(table(("ID", "ADDRESS", "PORT", "LABELS", "METRICS_PORT"), rows))
    return EXIT_OK


def _short(text: str | None, width: int = ERROR_WIDTH) -> str:
    """The first line of an error, cut to ``width`` characters (``…`` marks a cut)."""
    if not text:
        return "-"
    lines = text.strip().splitlines()
    line = lines[0] if lines else ""
    cut = len(line) > width or len(lines) > 1
    return line[: width - 1] + "…" if cut else line


def _cmd_get_instances(args: argparse.Namespace) -> int:
    with _registry(args) as client:
        instances = client.instances()
    if args.output != "text":
        print_document({"instances": [i.to_json() for i in instances]}, args.output)
        return EXIT_OK
    if not instances:
        print("no instances registered")
        return EXIT_OK
    rows = [
        (
            i.id,
            f"{i.service}.{i.namespace}",
            f"{i.address}:{i.port}",
            f"{i.last_heartbeat_age:.1f}s",
            _dash(i.applied_version),
            _dash(i.rejected_version),
            _short(i.error),
        )
        for i in instances
    ]
    headers = ("ID", "SERVICE", "ADDRESS", "HEARTBEAT", "APPLIED", "REJECTED", "ERROR")
    print(table(headers, rows))
    print(
        "\nHEARTBEAT: seconds since the last one; APPLIED, REJECTED: the policy versions the "
        "instance loaded and refused (-o json has the whole ERROR)"
    )
    return EXIT_OK


# --- history, rollback -------------------------------------------------------------------------


def _add_history(sub: Subparsers) -> None:
    p = sub.add_parser(
        "history",
        help="every policy version the registry keeps: digest, author, time",
        description="List the registry's policy versions, oldest first (no text: "
        "'meshctl get policy' prints the current one).",
    )
    _connection(p)
    add_output_option(p)
    p.set_defaults(func=_cmd_history)


def _short_digest(digest: str | None) -> str:
    return digest.removeprefix("sha256:")[:12] if digest else "-"


def _cmd_history(args: argparse.Namespace) -> int:
    with _registry(args) as client:
        versions = client.history()
    if args.output != "text":
        kept = ("version", "digest", "author", "created_at", "created", "rollback_of")
        document = [{k: _policy_document(v)[k] for k in kept} for v in versions]
        print_document({"versions": document}, args.output)
        return EXIT_OK
    if not versions:
        print("no policy applied yet")
        return EXIT_OK
    rows = [
        (
            v.version,
            _short_digest(v.digest),
            v.author or "-",
            _when(v.created_at),
            _dash(v.rollback_of),
        )
        for v in versions
    ]
    print(table(("VERSION", "DIGEST", "AUTHOR", "CREATED", "ROLLBACK_OF"), rows))
    return EXIT_OK


def _add_rollback(sub: Subparsers) -> None:
    p = sub.add_parser(
        "rollback",
        help="make an earlier policy version current again (as a new version)",
        description="Apply the text of VERSION again; the registry records it as a new version "
        "whose rollback_of is VERSION. Needs an admin SVID.",
    )
    p.add_argument("version", type=int, metavar="VERSION", help="a version 'meshctl history' lists")
    p.add_argument(
        "--if-match",
        type=int,
        metavar="VERSION",
        help="roll back only if the registry is still at this version",
    )
    _connection(p)
    add_output_option(p)
    p.set_defaults(func=_cmd_rollback)


def _cmd_rollback(args: argparse.Namespace) -> int:
    from meshlib.control.client import RegistryNotFound

    with _registry(args) as client:
        try:
            applied = client.rollback(args.version, if_match=args.if_match)
        except RegistryNotFound as exc:
            raise CommandFailed(
                f"no version {args.version} in the registry (meshctl history lists them)"
            ) from exc
    if args.output != "text":
        document = {
            "version": applied.version,
            "rollback_of": applied.rollback_of,
            "digest": applied.digest,
            "changed": applied.changed,
        }
        print_document(document, args.output)
    elif applied.changed:
        print(f"applied version {applied.version} (rollback of version {applied.rollback_of})")
    else:
        print(
            f"unchanged: version {applied.version} already has the text of "
            f"version {applied.rollback_of}"
        )
    return EXIT_OK


# --- registry status ---------------------------------------------------------------------------


def add_registry_status(verbs: Subparsers) -> None:
    """``registry status``: added to :mod:`meshlib.cli.registry`'s sub-verbs."""
    p = verbs.add_parser(
        "status",
        help="a running registry's epoch, state, counts and policy version",
        description="Read a running registry's /v1/status.",
    )
    _connection(p)
    add_output_option(p)
    p.set_defaults(func=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    with _registry(args) as client:
        status = client.status()
    if args.output != "text":
        print_document(status.to_json(), args.output)
        return EXIT_OK
    print(format_status(status))
    return EXIT_OK


def format_status(status: RegistryStatusInfo) -> str:
    reason = f" ({status.reason})" if status.reason else ""
    authoritative = "yes" if status.authoritative else "no (answers may be incomplete)"
    replica = []
    if status.replica is not None:
        store = "ok" if status.replica.store_ok else "FAILING (writes answer 503)"
        watch = "ok" if status.replica.watch_ok else "BROKEN (re-listing)"
        replica = [f"replica:        store {store}, watch {watch}"]
    return "\n".join(
        [
            f"epoch:          {status.epoch}",
            f"state:          {status.state}{reason}",
            f"authoritative:  {authoritative}",
            f"instances:      {status.instances} in {status.services} service(s)",
            f"policy version: {status.policy_version}",
            f"store:          {status.store}",
            *replica,
            f"uptime:         {status.uptime_seconds:.0f}s",
            f"watchers:       {status.watchers}",
            f"refusals:       {status.refusals}",
        ]
    )


VERBS: tuple[Registrar, ...] = (_add_apply, _add_get, _add_history, _add_rollback)
