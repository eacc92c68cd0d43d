"""``meshctl registry init|serve``: make a registry's data dir (its CA and the registry's and
meshctl's SVIDs) and serve the registry from it over mutual TLS (``registry status``, a client
of a running registry, is :mod:`meshlib.cli.registry_client`'s).

Layout of ``DIR`` after ``registry init`` (docs/control-plane.md, "The CLI")::

    DIR/ca/         the CA, as ``meshctl ca init`` makes it (kept if already there)
    DIR/registry/   the registry's SVID   spiffe://TD/ns/meshlib-system/sa/registry
    DIR/admin/      meshctl's SVID        spiffe://TD/ns/meshlib-system/sa/meshctl (an admin)
    DIR/registry.db, DIR/registry.lock    the SQLite store, once ``serve`` ran

With ``serve --store etcd --etcd URL[,URL...]`` the registry's state lives in etcd instead and
several replicas serve it at once, each from its own copy of ``DIR`` (docs/control-plane.md,
"Replicas"): no ``registry.db`` and no lock.

The registry's and meshctl's SVIDs last 24 h: re-run ``registry init`` (it keeps the CA and
re-issues both) before they expire. Workloads renew theirs through the registry
(``meshlib.control.remote.RemoteIssuer``), which signs them from ``DIR/ca``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshlib.cli.command import EXIT_OK, CommandFailed, Registrar, Subparsers, UsageError
from meshlib.cli.registry_client import add_registry_status

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from meshlib.config.model import MTLSMode, Snapshot
    from meshlib.control.app import RegistryApp
    from meshlib.control.registry import RegistrySettings
    from meshlib.control.store import Store
    from meshlib.inbound.serving import CertMetrics

__all__ = [
    "ADMIN_DIR",
    "CA_DIR",
    "REGISTRY_DIR",
    "VERBS",
    "RegistryDir",
    "init_registry_dir",
    "registry_with_metrics",
]

CA_DIR = "ca"
REGISTRY_DIR = "registry"
ADMIN_DIR = "admin"
#: Lifetime of the SVIDs ``registry init`` issues.
SVID_TTL = dt.timedelta(hours=24)

_RENEW_NOTE = (
    "The SVIDs last 24 h (the registry's and meshctl's): re-run 'meshctl registry init --data "
    "DIR' (the CA is kept, both SVIDs are re-issued) before they expire; workloads renew "
    "theirs through the registry (issue 12)."
)


@dataclass(frozen=True)
class RegistryDir:
    """A registry data dir made by :func:`init_registry_dir`."""

    path: Path
    trust_domain: str

    @property
    def ca(self) -> Path:
        return self.path / CA_DIR

    @property
    def registry_svid(self) -> Path:
        return self.path / REGISTRY_DIR

    @property
    def admin_svid(self) -> Path:
        return self.path / ADMIN_DIR

    def issue(self, namespace: str, service_account: str, out: str | Path) -> Path:
        """Issue a workload SVID from ``DIR/ca`` into ``out`` (as ``meshctl ca issue``)."""
        from meshlib.identity import SpiffeID
        from meshlib.identity.cadir import CADirectory

        spiffe_id = SpiffeID.for_workload(self.trust_domain, namespace, service_account)
        CADirectory(self.ca).issue(spiffe_id, out=out, ttl=SVID_TTL)
        return Path(out)


def init_registry_dir(data: str | Path, trust_domain: str | None = None) -> RegistryDir:
    """Make ``data``'s CA (unless ``data/ca`` has one) and issue the registry's and meshctl's
    SVIDs into ``data/registry`` and ``data/admin``. Raises
    :class:`~meshlib.identity.IdentityError` on a CA problem."""
    from meshlib.control.wire import REGISTRY_NAMESPACE
    from meshlib.identity import DEFAULT_TRUST_DOMAIN, CAError, SpiffeID
    from meshlib.identity.cadir import CADirectory

    path = Path(data)
    path.mkdir(parents=True, exist_ok=True)
    cadir = CADirectory(path / CA_DIR)
    if (path / CA_DIR / "ca.pem").exists():
        td = cadir.current().trust_domain
        if trust_domain is not None and trust_domain != td:
            raise CAError(
                f"{path / CA_DIR} is the CA of trust domain {td}, not {trust_domain}: "
                "use another --data dir"
            )
    else:
        td = cadir.init(trust_domain or DEFAULT_TRUST_DOMAIN).trust_domain
    made = RegistryDir(path, td)
    for sa, out in (("registry", made.registry_svid), ("meshctl", made.admin_svid)):
        spiffe_id = SpiffeID.for_workload(td, REGISTRY_NAMESPACE, sa)
        cadir.issue(spiffe_id, out=out, ttl=SVID_TTL)
    return made


class RegistryServed:
    """What :func:`meshlib.inbound.serving.serve` needs of a mesh (its ``ServedMesh``), for the
    registry: its trust domain and strict mTLS; no metrics. With ``app``, its ``on_serving``
    hook hands the server the app's release, which ``Server.stop`` runs first: the held
    blocking queries are answered before the grace period would cancel them."""

    def __init__(self, trust_domain: str, app: RegistryApp | None = None) -> None:
        from meshlib.config.loader import load_text

        self._app = app
        self._snapshot = load_text(
            "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: registry}\n"
            f"spec: {{trustDomain: {trust_domain}, mtls: strict}}\n",
            source="registry",
        )

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def metrics(self) -> CertMetrics | None:
        return None

    def mtls_mode(self, service_key: str | None = None) -> MTLSMode:
        from meshlib.config.model import MTLSMode

        return MTLSMode.STRICT

    def on_serving(self, host: str, port: int, scheme: str) -> _Release | None:
        """``serve``'s hook: its stop closes the result first, which answers the held
        long-polls before uvicorn's graceful shutdown waits on them."""
        return None if self._app is None else _Release(self._app)


class _Release:
    """Closed first by ``Server.stop``: answers the app's held queries."""

    def __init__(self, app: RegistryApp) -> None:
        self._app = app

    def close(self) -> None:
        self._app.release()


def registry_with_metrics(
    store: Store, *, trust_domain: str, collector: CollectorRegistry | None = None, **options: Any
) -> RegistryApp:
    """The registry's app as ``registry serve`` runs it: reporting to a
    :class:`~meshlib.observe.metrics.RegistryMetrics` in ``collector`` (default: the process's
    Prometheus registry) and answering ``GET /metrics`` from it, behind the same mTLS and SVID
    check as every other path. ``options`` go to :class:`~meshlib.control.app.RegistryApp`."""
    from meshlib.control.app import RegistryApp
    from meshlib.observe.exporter import metrics_app
    from meshlib.observe.metrics import RegistryMetrics

    return RegistryApp(
        store,
        trust_domain=trust_domain,
        metrics=RegistryMetrics(collector),
        exposition=metrics_app(collector),
        **options,
    )


def _add_registry(sub: Subparsers) -> None:
    registry = sub.add_parser(
        "registry",
        help="make a registry data dir, serve the registry from it, read its status",
        description="The registry service: discovery, self-registration and policy. " + _RENEW_NOTE,
    )
    verbs = registry.add_subparsers(dest="registry_verb", metavar="VERB", required=True)
    init = verbs.add_parser(
        "init",
        help="make DIR/ca (unless present) and the registry's and meshctl's SVIDs",
        description="Write DIR/ca (as 'meshctl ca init'), DIR/registry (the registry's SVID, "
        "spiffe://TD/ns/meshlib-system/sa/registry) and DIR/admin (meshctl's SVID, "
        "spiffe://TD/ns/meshlib-system/sa/meshctl, an admin). " + _RENEW_NOTE,
    )
    init.add_argument("--data", required=True, metavar="DIR", help="the registry's data dir")
    init.add_argument("--trust-domain", help="for a new CA (default cluster.local)")
    init.set_defaults(func=_cmd_init)
    serve = verbs.add_parser(
        "serve",
        help="serve the registry over mTLS from DIR (one process per DIR)",
        description="Serve the registry's HTTPS API with DIR/registry's SVID, signing CSRs "
        "with DIR/ca; every path needs a client SVID of DIR/ca's trust domain but /healthz, "
        "/readyz and POST /v1/ca/sign with a join token (TLS only: plain HTTP is refused). "
        "Stops on SIGTERM or SIGINT. " + _RENEW_NOTE,
    )
    serve.add_argument("--data", required=True, metavar="DIR", help="from 'registry init'")
    serve.add_argument(
        "--listen", default="127.0.0.1:8700", metavar="HOST:PORT", help="default 127.0.0.1:8700"
    )
    serve.add_argument(
        "--store",
        choices=("sqlite", "memory", "etcd"),
        default="sqlite",
        help="sqlite (DIR/registry.db, one process per DIR; the default), memory (lost on "
        "stop) or etcd (--etcd: several replicas share one etcd cluster)",
    )
    serve.add_argument(
        "--etcd",
        metavar="URL[,URL...]",
        help="with --store etcd: the etcd cluster's client URLs, e.g. "
        "http://10.0.0.1:2379,http://10.0.0.2:2379",
    )
    serve.add_argument(
        "--etcd-prefix",
        default="",
        metavar="PREFIX",
        help="with --store etcd: put every key under PREFIX (several registries share a "
        "cluster; default none)",
    )
    serve.add_argument(
        "--svid-ttl",
        default="24h",
        metavar="DURATION",
        help="lifetime of the SVIDs POST /v1/ca/sign issues, e.g. 24h, 90m (default 24h)",
    )
    serve.add_argument(
        "--instance-ttl",
        default="10s",
        metavar="DURATION",
        help="TTL of an instance that registers without one, and the warming period after "
        "start (one TTL), e.g. 10s, 3s (default 10s; workloads heartbeat every TTL/3)",
    )
    serve.set_defaults(func=_cmd_serve)
    add_registry_status(verbs)  # a client of a running registry: with apply, get...


def _cmd_init(args: argparse.Namespace) -> int:
    from meshlib.identity import IdentityError

    try:
        made = init_registry_dir(args.data, args.trust_domain)
    except IdentityError as exc:
        raise CommandFailed(exc.reason) from exc
    except OSError as exc:
        raise CommandFailed(f"{args.data}: {exc.strerror}") from exc
    print(f"{made.ca}: CA of spiffe://{made.trust_domain}")
    print(f"{made.registry_svid}: the registry's SVID (valid 24 h)")
    print(f"{made.admin_svid}: meshctl's admin SVID (valid 24 h)")
    return EXIT_OK


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as (host, port); UsageError naming the problem."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen must be HOST:PORT (port 0..65535), got {text!r}")
    return host.strip("[]"), int(port)


def etcd_urls(text: str) -> list[str]:
    """``--etcd``'s comma-separated client URLs; UsageError naming a bad one."""
    from urllib.parse import urlsplit

    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise UsageError("--etcd needs at least one URL, e.g. http://127.0.0.1:2379")
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--etcd: {url!r} is not an http(s)://HOST:PORT URL")
        try:
            port = parts.port
        except ValueError:  # not a number, or out of range
            port = None
        if port is None or parts.path.strip("/"):
            raise UsageError(f"--etcd: {url!r} must be http(s)://HOST:PORT (a port, no path)")
    return urls


def instance_settings(text: str) -> RegistrySettings:
    """``--instance-ttl``'s core settings: that default TTL and one TTL of warming (every live
    instance heartbeats within it). UsageError naming the flag for a bad duration."""
    from meshlib.config.values import parse_duration
    from meshlib.control.app import MAX_TTL, MIN_TTL
    from meshlib.control.registry import RegistrySettings

    try:
        ttl = parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"--instance-ttl: {exc}") from None
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise UsageError(f"--instance-ttl must be {MIN_TTL:g}s..{MAX_TTL:g}s, got {text!r}")
    return RegistrySettings(default_ttl=ttl, warming=ttl)


def store_options(args: argparse.Namespace) -> dict[str, Any]:
    """The flags' choice of store, checked: ``store`` (sqlite, memory, etcd) and, for etcd,
    ``etcd`` (the URLs), ``prefix`` and the app's replica options (``replicas``,
    ``debounce``). UsageError for a wrong combination, naming the flags."""
    if args.store != "etcd":
        for flag, value in (("--etcd", args.etcd), ("--etcd-prefix", args.etcd_prefix)):
            if value:
                raise UsageError(f"{flag} goes with --store etcd (the store is {args.store})")
        return {"store": args.store}
    if not args.etcd:
        raise UsageError("--store etcd needs --etcd URL[,URL...] (the cluster's client URLs)")
    return {
        "store": "etcd",
        "etcd": etcd_urls(args.etcd),
        "prefix": args.etcd_prefix,
        # stateless replicas over one cluster: mirror it, and debounce wake-ups
        # (100 ms quiet, at most 1 s: CONTROL-PLANE.md section 3)
        "app": {"replicas": True, "debounce": (0.1, 1.0)},
    }


def open_store(chosen: dict[str, Any], data: Path) -> Store:
    """The store :func:`store_options` chose (an etcd store's module is imported only here)."""
    from meshlib.control.memory import MemoryStore
    from meshlib.control.sqlite import SQLiteStore

    if chosen["store"] == "etcd":
        from meshlib.control.etcd import EtcdStore  # only a replica needs it

        return EtcdStore(chosen["etcd"], prefix=chosen["prefix"])
    if chosen["store"] == "sqlite":
        return SQLiteStore(data)  # takes the data dir's lock: one process per DIR
    return MemoryStore()


def _cmd_serve(args: argparse.Namespace) -> int:
    from meshlib.config.values import parse_duration
    from meshlib.control import tokens
    from meshlib.control.store import StoreError
    from meshlib.control.wire import SERVER_KEEP_ALIVE
    from meshlib.identity import IdentityError
    from meshlib.identity.cadir import CADirectory
    from meshlib.inbound.serving import serve

    chosen = store_options(args)
    host, port = parse_listen(args.listen)
    try:
        svid_ttl = dt.timedelta(seconds=parse_duration(args.svid_ttl))
    except ValueError as exc:
        raise UsageError(f"--svid-ttl: {exc}") from None
    if svid_ttl <= dt.timedelta(0):
        raise UsageError(f"--svid-ttl must be positive, got {args.svid_ttl!r}")
    settings = instance_settings(args.instance_ttl)
    data = Path(args.data)
    if not (data / REGISTRY_DIR / "cert.pem").exists():
        raise CommandFailed(f"{data}: no registry SVID; run 'meshctl registry init --data {data}'")
    try:
        trust_domain = CADirectory(data / CA_DIR).current().trust_domain
        store = open_store(chosen, data)
    except (IdentityError, StoreError) as exc:
        raise CommandFailed(str(exc)) from exc
    # The CA dir is polled every second ('meshctl ca rotate'/'revoke' reach the workloads, and
    # the registry's own SVID dir, which the server polls: it refuses revoked clients too) and
    # signs CSRs: renewals by SVID, first contacts by the join tokens kept in the store.
    app = registry_with_metrics(
        store,
        trust_domain=trust_domain,
        ca_dir=data / CA_DIR,
        svid_dir=data / REGISTRY_DIR,
        svid_ttl=svid_ttl,
        join_tokens=tokens,
        settings=settings,
        **chosen.get("app", {}),
    )
    try:
        server = serve(
            app,
            mesh=RegistryServed(trust_domain, app),
            host=host,
            port=port,
            svid_dir=str(data / REGISTRY_DIR),
            mode="strict",
            # a first contact has a join token, not yet an SVID: the app decides per path
            client_cert="optional",
            # on (1 s): the CRLs the app copies from DIR/ca into DIR/registry reach the server
            svid_poll_interval=1.0,
            # past the clients' keep-alive: a client always lets an idle connection go first
            timeout_keep_alive=SERVER_KEEP_ALIVE,
        )
    except (IdentityError, RuntimeError, TimeoutError, OSError) as exc:
        _close(store)
        raise CommandFailed(f"cannot serve on {args.listen}: {exc}") from exc
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"registry serving on {server.url} (trust domain {trust_domain})", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        server.stop()  # the lifespan shutdown closes the store
    print("registry stopped", file=sys.stderr)
    return EXIT_OK


def _close(store: object) -> None:
    """Close a store that never reached the app's lifespan (the data dir's lock goes with it)."""
    import asyncio

    close = getattr(store, "close", None)
    if close is not None:
        asyncio.run(close())


VERBS: tuple[Registrar, ...] = (_add_registry,)
