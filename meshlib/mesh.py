"""The Mesh: holds the current policy snapshot (hot-reloaded), the run-time state of every
destination, and hands out httpx clients and transports that call through it."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypedDict

import httpx

from meshlib.config.model import (
    AbortFault,
    DelayFault,
    Egress,
    Endpoint,
    FaultRule,
    MTLSMode,
    PolicyTarget,
    Snapshot,
)
from meshlib.decision import Decision
from meshlib.errors import AccessDeniedError, ConfigError
from meshlib.observe.tracehook import TracingHook
from meshlib.outbound.call import Effect, run_call
from meshlib.outbound.destination import Destination
from meshlib.outbound.egress import close_service
from meshlib.outbound.transport import (
    AsyncMeshClient,
    AsyncMeshTransport,
    MeshClient,
    MeshTransport,
)
from meshlib.policy.routing import Router

if TYPE_CHECKING:
    import ssl

    # httpx's own names for its argument types: exact for every supported httpx version, and
    # read by the type checker only (nothing imports httpx._types at run time).
    from httpx._types import (
        AuthTypes,
        CertTypes,
        CookieTypes,
        HeaderTypes,
        ProxyTypes,
        QueryParamTypes,
        TimeoutTypes,
    )
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

    from meshlib.config.loader import ReadCache
    from meshlib.control.agent import RegistryAgent
    from meshlib.control.registrar import RegistrationHandle
    from meshlib.identity.renewal import Issuer, RenewalMetrics, Renewer
    from meshlib.identity.rotation import RotationStatus, RotationWatcher
    from meshlib.identity.tls import SVIDMaterial, SVIDSource
    from meshlib.inbound.middleware import InboundHost
    from meshlib.inbound.serving import ServedMesh, ServingHook
    from meshlib.observe.admin import AdminApp
    from meshlib.observe.events import EventHub
    from meshlib.observe.metrics import MeshMetrics
    from meshlib.outbound.mtls import AsyncMeshTLSTransport, MeshTLSTransport, PeerVerifier
    from meshlib.outbound.stream import StreamEndpoint

log = logging.getLogger("meshlib")

_versions = itertools.count(1)
_DISABLE = MTLSMode.DISABLE

#: What :meth:`Mesh.from_file` takes: one file or directory, or several.
PolicyPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


@dataclass(frozen=True)
class ReloadStatus:
    """The outcome of the last reload attempt, for `meshctl` and debug pages."""

    ok: bool
    version: int  # the snapshot version in force after the attempt
    error: ConfigError | None = None
    digest: str | None = None  # sha256 of the rejected (or applied) content
    at: float = 0.0  # wall-clock time of the attempt


@dataclass(frozen=True)
class DiscoveredEndpoints:
    """One service's endpoints as the registry last reported them (:meth:`Mesh.set_endpoints`)."""

    endpoints: tuple[Endpoint, ...]
    authoritative: bool


class DiscoveredSets:
    """The endpoints discovered per service key (:meth:`Mesh.set_endpoints`) and a generation
    that every change bumps, so the mTLS check (which must also know the identity of an
    endpoint only the registry lists) re-derives its table on a change, not per connection."""

    def __init__(self) -> None:
        self.sets: dict[str, DiscoveredEndpoints] = {}
        self._generation = 0

    def put(self, service_key: str, found: DiscoveredEndpoints) -> None:
        self.sets[service_key] = found
        self._generation += 1

    def generation(self) -> int:
        return self._generation

    def endpoints(self, service_key: str) -> tuple[Endpoint, ...]:
        found = self.sets.get(service_key)
        return () if found is None else found.endpoints


class ClientOptions(TypedDict, total=False):
    """The keyword arguments of :meth:`Mesh.client` and :meth:`Mesh.async_client`: those of
    ``httpx.Client``/``httpx.AsyncClient`` except ``transport`` and ``mounts`` (the mesh is
    the transport), plus the inner transport's ``retries`` and the mesh's ``local_responses``.
    A TypedDict, so IDEs and mypy see every name and type while the values reach httpx as
    given (an omitted one keeps httpx's default)."""

    auth: AuthTypes | None
    params: QueryParamTypes | None
    headers: HeaderTypes | None
    cookies: CookieTypes | None
    verify: ssl.SSLContext | str | bool
    cert: CertTypes | None
    trust_env: bool
    http1: bool
    http2: bool
    proxy: ProxyTypes | None
    timeout: TimeoutTypes
    follow_redirects: bool
    limits: httpx.Limits
    max_redirects: int
    event_hooks: Mapping[str, list[Callable[..., Any]]] | None
    base_url: httpx.URL | str
    default_encoding: str | Callable[[bytes], str]
    retries: int  # connect retries of the inner httpx transport (below the mesh's own)
    local_responses: bool  # mesh failures as local responses (default: the mesh's setting)


class FaultHandle:
    """A fault added at run time (by :mod:`meshlib.testing`); remove it to undo."""

    def __init__(self, mesh: Mesh, rule: FaultRule) -> None:
        self._mesh = mesh
        self.rule = rule

    def remove(self) -> None:
        self._mesh._remove_fault(self.rule)

    def __enter__(self) -> FaultHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Mesh:
    """An embedded mesh for one service.

    ``clock`` (monotonic seconds) and ``seed`` make decisions reproducible in tests; the
    defaults are ``time.monotonic`` and an unseeded RNG. With ``svid_dir``, the SVID files are
    polled every ``svid_poll_interval`` seconds (``None``: never) and a renewed pair is swapped
    in for new connections (:mod:`meshlib.identity.rotation`; see :attr:`svid_status`).
    ``tracer_provider`` records the mesh's spans (default: OpenTelemetry's global provider,
    looked up until one is set; :mod:`meshlib.observe.tracing`, loaded by
    :mod:`meshlib.observe.tracehook` only once OpenTelemetry is in the process).
    """

    def __init__(
        self,
        snapshot: Snapshot,
        *,
        service: str,
        namespace: str = "default",
        path: PolicyPaths | None = None,
        watch: bool = True,
        poll_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        registry: CollectorRegistry | None = None,
        metrics: bool = True,
        local_responses: bool = False,
        svid_dir: str | os.PathLike[str] | None = None,
        svid_poll_interval: float | None = 1.0,
        access_log: str | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.service = service
        self.namespace = namespace
        self.source = f"{service}.{namespace}"
        self.clock = clock
        self._rng = random.Random(seed)
        self.metrics: MeshMetrics | None = None
        if metrics:
            from meshlib.observe.metrics import MeshMetrics  # prometheus-client loads on first use

            self.metrics = MeshMetrics.for_registry(registry)
        self.local_responses = local_responses
        #: Retries wait no backoff (:func:`meshlib.testing.instant_retries` sets it in tests).
        self.instant_backoff = False
        # OpenTelemetry's API loads only once something in the process imported it (an SDK,
        # instrumentation) or a request brings a trace context: meshlib.observe.tracehook.
        self.tracing = TracingHook(tracer_provider, lambda: self._router.snapshot.mesh, clock, seed)
        # Endpoints discovered per service key (set_endpoints), kept apart from the snapshot so
        # an update costs one service, not a new Snapshot and Router.
        self._discovered = DiscoveredSets()
        #: This workload's SVID (``svid_dir``): calls to mesh services use mTLS with it when
        #: the snapshot's ``spec.mtls`` is strict or permissive.
        self.svid: SVIDSource | None = None
        self._peer_verifier: PeerVerifier | None = None
        self._rotation: RotationWatcher | None = None
        self._renewer: Renewer | None = None
        if svid_dir is not None:
            from meshlib.identity.tls import SVIDSource
            from meshlib.outbound.mtls import PeerVerifier

            self.svid = SVIDSource(svid_dir, trust_domain=snapshot.mesh.trust_domain)
            self._peer_verifier = PeerVerifier(
                lambda: self._router.snapshot, self.svid, self._discovered
            )
            if svid_poll_interval is not None:
                from meshlib.identity.rotation import RotationWatcher

                self._rotation = RotationWatcher(
                    self.svid,
                    rng=random.Random(seed),
                    poll_interval=svid_poll_interval,
                    on_reload=self._set_cert_expiry,
                ).start()
        self._router = Router(snapshot)
        self._destinations: dict[str, Destination] = {}
        #: The registry link (:meth:`from_registry`): discovery, registrar, cache file.
        self._agent: RegistryAgent | None = None
        #: The labels and metrics port ``serve`` registers this workload's instance with.
        self._served_as: tuple[dict[str, str], int | None] = ({}, None)
        self._lock = threading.Lock()
        self._faults: tuple[FaultRule, ...] = ()
        self._fault_index: dict[tuple[str, str | None], tuple[FaultRule, ...]] = {}
        self.reload_status = ReloadStatus(True, snapshot.version, digest=snapshot.digest)
        #: Call-event consumers (meshlib.observe); None, the hooks' only cost, until one attaches.
        self.events: EventHub | None = None
        self.last_rejected: ReloadStatus | None = None  # the last rejected reload, kept after
        self._access_log = access_log  # "json" | "text": wins over the policy's spec.accessLog
        self._sync_observers()
        #: The policy files and directories this mesh was loaded from and watches.
        self._paths = _policy_paths(path) if path is not None else ()
        self._poll_interval = poll_interval
        self._stop = threading.Event()
        self._reload_lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        #: The documents of the files last read, for the next reload (:class:`ReadCache`).
        self._read_cache: ReadCache | None = None
        # The files' state the snapshot was read at: taken here, before the watcher starts, so
        # a change written as soon as the constructor returns is a change to the watcher.
        self._watched = _policy_stat(self._paths) if self._paths and watch else None
        if self._paths and watch:
            self._watcher = threading.Thread(
                target=self._watch, name=f"meshlib-watch-{self._paths[0].name}", daemon=True
            )
            self._watcher.start()

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_file(
        cls,
        path: PolicyPaths,
        *,
        service: str,
        namespace: str = "default",
        **kwargs: Any,
    ) -> Mesh:
        """Load and validate a policy file (raises ConfigError) and watch it for changes.

        ``path`` may also be a directory, meaning its ``*.yaml`` and ``*.yml`` files sorted by
        name (not recursive, hidden files skipped), or a sequence of files and directories:
        all are validated as one policy (references may cross files) and watched, and a
        change to any file, or a file added to or removed from a directory, reloads the whole
        set as one snapshot."""
        from meshlib.config.loader import ReadCache, load_paths  # YAML, RE2 load on first use

        paths = _policy_paths(path)
        read_at = _policy_stat(paths)
        cache = ReadCache()
        snapshot = load_paths(paths, version=next(_versions), cache=cache)
        mesh = cls(snapshot, service=service, namespace=namespace, path=paths, **kwargs)
        with mesh._reload_lock:  # a reload reads only the files changed since this load
            mesh._read_cache = cache
        if mesh._watcher is not None and mesh._watched != read_at:
            # Changed while being read: the snapshot may be older than the files, and the
            # watcher compares with the files as they are now.
            mesh.reload()
        return mesh

    @classmethod
    def from_text(
        cls, text: str | bytes, *, service: str, namespace: str = "default", **kwargs: Any
    ) -> Mesh:
        """A mesh from policy text, or UTF-8 bytes (no file, no watching)."""
        from meshlib.config.loader import load_text

        snapshot = load_text(text, version=next(_versions))
        return cls(snapshot, service=service, namespace=namespace, **kwargs)

    @classmethod
    def from_registry(
        cls,
        url: str | Sequence[str],
        *,
        service: str,
        namespace: str = "default",
        svid_dir: str | os.PathLike[str],
        cache_dir: str | os.PathLike[str] | None = None,
        policy_file: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
        startup_timeout: float = 3.0,
        watch_wait: float | None = None,
        labels: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        join_token: str | None = None,
        bundle: str | os.PathLike[str] | None = None,
        renew: bool | Mapping[str, Any] = True,
        **kwargs: Any,
    ) -> Mesh:
        """A mesh whose policy and endpoints come from the registry at ``url`` (DESIGN.md §8),
        over mTLS with the SVID in ``svid_dir``; ``policy_file`` (one path or several) adds to
        the registry's policy and is re-read with each version.

        Start-up waits at most ``startup_timeout`` seconds for the registry; without it the
        mesh starts from the cache file (``cache_dir``, default ``$MESHLIB_CACHE_DIR`` or
        ``~/.cache/meshlib``; 0600), else from the local files, and catches up when the
        registry answers. Use :meth:`register` (or :func:`meshlib.serve`) to be discovered.
        ``watch_wait`` is the long-poll's hold in seconds (the registry's default: 60).
        ``labels`` and ``metrics_port`` are what :func:`meshlib.serve` registers the served
        instance with (subset routing, Prometheus discovery).

        Identity (docs/security.md "Bootstrap"): when ``svid_dir`` holds no usable SVID,
        ``join_token`` (a join string, or a bare token with ``bundle``, a bundle.pem path) is
        traded for one first. The SVID is then renewed by the registry at half-life
        (:class:`~meshlib.control.remote.RemoteIssuer`); ``renew=False`` opts out, a mapping
        gives the :class:`~meshlib.identity.renewal.Renewer` options.

        ``url`` may list several registries (replicas over one store): a sequence, or one
        string of URLs separated by commas. Every part (start-up, discovery, the registrar, the
        trust bundle, renewal) shares which one is in use and moves to the next when it fails.
        """
        from meshlib.config.loader import load_texts
        from meshlib.control.agent import RegistryAgent, cache_path, starting_point
        from meshlib.control.cache import CacheFile
        from meshlib.control.client import RegistryURLs
        from meshlib.control.remote import RemoteIssuer, ensure_svid
        from meshlib.identity.tls import SVIDSource

        if policy_file is None:
            local: list[str] = []
        elif isinstance(policy_file, (str, os.PathLike)):
            local = [os.fspath(policy_file)]
        else:
            local = [os.fspath(p) for p in policy_file]
        registry = RegistryURLs(url)  # a bad URL is named here, before anything starts
        svid = os.fspath(svid_dir)
        ensure_svid(registry, svid, join_token=join_token, bundle=bundle)
        trust_domain = SVIDSource(svid).trust_domain
        cache = CacheFile(cache_path(cache_dir, namespace, service), ",".join(registry.urls))

        def load(sources: list[tuple[str, str]]) -> Snapshot:
            return load_texts(sources, version=next(_versions))

        start = starting_point(
            registry,
            svid_dir=svid,
            local=local,
            cache=cache,
            trust_domain=trust_domain,
            load=load,
            timeout=startup_timeout,
        )
        snapshot = start.snapshot
        mesh = cls(snapshot, service=service, namespace=namespace, svid_dir=svid, **kwargs)
        mesh._served_as = (dict(labels or {}), metrics_port)
        try:
            mesh._agent = RegistryAgent(
                registry,
                mesh,
                svid_dir=svid,
                local=local,
                cache=cache,
                start=start,
                metrics=mesh.metrics,
                wait=watch_wait,
                source=mesh.svid,
            ).start()
            if renew:
                options = dict(renew) if isinstance(renew, Mapping) else {}
                mesh.start_renewal(RemoteIssuer(registry, svid), **options)
        except BaseException:
            mesh.close()
            raise
        return mesh

    @classmethod
    def from_env(cls, **kwargs: Any) -> Mesh:
        """A mesh configured by the environment (DESIGN.md §8): ``MESHLIB_SERVICE`` (required),
        ``MESHLIB_NAMESPACE`` (default ``default``), and either ``MESHLIB_REGISTRY`` (one URL,
        or several separated by commas; with
        ``MESHLIB_SVID_DIR``; ``MESHLIB_POLICY`` then adds local files, ``MESHLIB_LABELS``
        (``version=v2,zone=a``) and ``MESHLIB_METRICS_PORT`` describe the served instance;
        ``MESHLIB_JOIN_TOKEN``, a join string (which also names the registry) or a bare token
        with ``MESHLIB_BUNDLE``, gets the first SVID) or ``MESHLIB_POLICY``
        alone (policy files and directories, hot-reloaded as one policy: :meth:`from_file`).
        Several policy paths are separated by ``os.pathsep``. Keyword arguments go to
        :meth:`from_registry` / :meth:`from_file`."""
        env = os.environ
        service = env.get("MESHLIB_SERVICE", "").strip()
        if not service:
            raise ValueError("Mesh.from_env: set MESHLIB_SERVICE to this workload's service name")
        namespace = env.get("MESHLIB_NAMESPACE", "").strip() or "default"
        policies = [p for p in env.get("MESHLIB_POLICY", "").split(os.pathsep) if p.strip()]
        registry = env.get("MESHLIB_REGISTRY", "").strip()
        svid_dir = env.get("MESHLIB_SVID_DIR", "").strip() or None
        join_token = env.get("MESHLIB_JOIN_TOKEN", "").strip() or None
        if join_token is not None:
            from meshlib.control.remote import join_registry

            registry = registry or join_registry(join_token) or ""
            kwargs.setdefault("join_token", join_token)
            kwargs.setdefault("bundle", env.get("MESHLIB_BUNDLE", "").strip() or None)
        if registry:
            kwargs.setdefault("labels", _env_labels(env.get("MESHLIB_LABELS", "")))
            port_text = env.get("MESHLIB_METRICS_PORT", "").strip()
            if port_text:
                if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                    raise ValueError(
                        f"Mesh.from_env: MESHLIB_METRICS_PORT={port_text!r} is not a port"
                    )
                kwargs.setdefault("metrics_port", int(port_text))
            if svid_dir is None:
                raise ValueError(
                    "Mesh.from_env: MESHLIB_REGISTRY is set but MESHLIB_SVID_DIR is not: the "
                    "registry is reached over mTLS with this workload's SVID"
                )
            return cls.from_registry(
                registry,
                service=service,
                namespace=namespace,
                svid_dir=svid_dir,
                policy_file=policies or None,
                **kwargs,
            )
        if not policies:
            raise ValueError(
                "Mesh.from_env: set MESHLIB_REGISTRY (a registry URL) or MESHLIB_POLICY (policy "
                f"files or directories, separated by {os.pathsep!r})"
            )
        if svid_dir is not None:
            kwargs.setdefault("svid_dir", svid_dir)
        return cls.from_file(policies, service=service, namespace=namespace, **kwargs)

    # -- state ----------------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._router.snapshot

    @property
    def router(self) -> Router:
        return self._router

    @property
    def rng(self) -> random.Random:
        return self._rng

    @property
    def last_error(self) -> ConfigError | None:
        """The error of the last rejected reload, if the last attempt was rejected."""
        return self.reload_status.error

    def destination(self, key: str, router: Router) -> Destination:
        dest = self._destinations.get(key)
        if dest is not None and dest.version >= router.snapshot.version:
            return dest
        with self._lock:
            dest = self._destinations.get(key)
            service = router.services[key]
            policy = router.policy(key, None)
            if dest is None:
                discovered = self._discovered.endpoints(key)
                dest = Destination(service, policy, self.clock(), discovered)
                self._destinations[key] = dest
            elif dest.version < router.snapshot.version:
                dest.update(service, policy, self.clock())
            dest.version = max(dest.version, router.snapshot.version)
            return dest

    def destinations(self) -> Mapping[str, Destination]:
        return dict(self._destinations)

    def set_endpoints(
        self, service_key: str, endpoints: tuple[Endpoint, ...], *, authoritative: bool = True
    ) -> None:
        """Use ``endpoints`` (discovered from the registry) for ``service_key`` (``name.ns``)
        beside its static ``Service`` endpoints; the static one wins on the same address.

        The cost is that service's alone: no new snapshot, no Router rebuild; its destination,
        if one exists yet, updates its endpoint list in place and keeps the health of the
        endpoints that stay. Calls in flight keep the endpoint they picked. A service the
        policy does not declare still cannot be called: its endpoints are kept and used once a
        snapshot declares it. ``authoritative`` is recorded (:meth:`discovered`); the
        static-stability guard that uses it is discovery's
        (:func:`meshlib.control.discovery.accept`)."""
        name, dot, namespace = service_key.partition(".")
        if not (name and dot and namespace):
            raise ValueError(f"set_endpoints: service key {service_key!r} is not 'name.namespace'")
        endpoints = tuple(endpoints)
        for e in endpoints:
            host, colon, port = e.address.rpartition(":")
            if not (host and colon and port.isdigit()):
                raise ValueError(
                    f"set_endpoints({service_key!r}): address {e.address!r} is not 'host:port'"
                )
        with self._lock:  # destination() creates under this lock: no new one misses the set
            self._discovered.put(service_key, DiscoveredEndpoints(endpoints, authoritative))
            dest = self._destinations.get(service_key)
            if dest is not None:
                dest.set_discovered(endpoints)

    def discovered(self) -> Mapping[str, DiscoveredEndpoints]:
        """The endpoints :meth:`set_endpoints` gave, per service key."""
        return dict(self._discovered.sets)

    # -- calls ----------------------------------------------------------------------------------

    def start_call(self, request: httpx.Request) -> Generator[Effect, Any, httpx.Response] | None:
        """The call sequence for a request to a mesh service; None for other hosts. Raises
        AccessDeniedError for a host outside the mesh under ``egress: registry-only``."""
        router = self._router  # one snapshot for the whole call
        service = router.resolve(request.url.host, self.namespace)
        if service is None:
            if router.snapshot.mesh.egress is Egress.REGISTRY_ONLY:
                refused = _egress_refused(request, router.snapshot.version, self.close_service)
                self.tracing.refused(request, refused)
                raise refused
            return None
        return self.tracing.trace_call(run_call(self, router, service, request), request, service)

    def close_service(self, host: str) -> str | None:
        """The mesh service ``host`` (outside the mesh) was probably meant to name, or None;
        looked up only when a call to such a host has failed."""
        return close_service(host, self._router.services, self.namespace)

    def uses_mtls(self, router: Router, service_key: str) -> bool:
        """Whether calls to ``service_key`` under ``router``'s snapshot go over mutual TLS:
        this mesh has an SVID and the service's effective mode (a namespace or service
        TrafficPolicy ``mtls.mode``, else ``Mesh.spec.mtls``) is strict or permissive."""
        return self.svid is not None and router.policy(service_key, None).mtls is not _DISABLE

    def mtls_mode(self, service_key: str | None = None) -> MTLSMode:
        """The effective mTLS mode of ``service_key`` (default: this mesh's own service) now."""
        return self._router.policy(service_key or self.source, None).mtls

    def mtls_enabled(self, service_key: str | None = None) -> bool:
        """Whether calls to ``service_key`` (default: any service under the mesh-wide mode)
        use mTLS now."""
        if service_key is None:
            return self.svid is not None and self.snapshot.mesh.mtls is not _DISABLE
        return self.uses_mtls(self._router, service_key)

    def mtls_transport(self, limits: httpx.Limits | None = None) -> MeshTLSTransport:
        """A sync inner transport for mesh traffic: presents the SVID, checks the server's ID.
        Every one shares the SVID's current client context (a transport per endpoint must not
        build its own; handshakes take the verifier's context at connect time anyway)."""
        from meshlib.outbound.mtls import MeshTLSTransport

        verifier = self._peer_verifier
        assert self.svid is not None and verifier is not None
        return MeshTLSTransport(verifier.client_context(), verifier, limits=limits)

    def async_mtls_transport(self, limits: httpx.Limits | None = None) -> AsyncMeshTLSTransport:
        from meshlib.outbound.mtls import AsyncMeshTLSTransport

        verifier = self._peer_verifier
        assert self.svid is not None and verifier is not None
        return AsyncMeshTLSTransport(verifier.client_context(), verifier, limits=limits)

    def stream_endpoint(self, service_key: str) -> StreamEndpoint | None:
        """An endpoint of ``service_key`` for a long-lived stream (the gateway's WebSocket
        pass-through), picked as a call's first attempt is and counted in flight until the
        stream is released; plain TCP or mTLS as calls to the service are
        (:mod:`meshlib.outbound.stream`). None: the service is not declared or has no
        endpoint."""
        from meshlib.outbound.stream import StreamEndpoint

        router = self._router
        if service_key not in router.services:
            return None
        dest = self.destination(service_key, router)
        with dest.lock:
            state = dest.endpoints.pick(self.clock(), self._rng)
            if state is None:
                return None
            dest.endpoints.on_start(state)
        started = self.clock()

        def ended(failed: bool) -> None:
            with dest.lock:
                if not failed:
                    dest.endpoints.on_abandon(state)  # a stream's length says nothing of health
                    return
                now = self.clock()
                ejected = dest.endpoints.on_end(state, now, now - started, True)
            if ejected and self.metrics is not None:  # counted as a call's ejection is
                self.metrics.ejections.labels(self.source, service_key, state.address).inc()

        endpoint = state.endpoint
        verifier = self._peer_verifier
        if verifier is None or not self.uses_mtls(router, service_key):
            return StreamEndpoint(service_key, endpoint.host, endpoint.port, None, None, ended)
        return StreamEndpoint(
            service_key,
            endpoint.host,
            endpoint.port,
            verifier.client_context(),
            verifier.verify,
            ended,
        )

    def transport(self, **kwargs: Any) -> MeshTransport:
        """An httpx sync transport; ``kwargs`` configure the inner ``httpx.HTTPTransport``."""
        kwargs.setdefault("local_responses", self.local_responses)
        return MeshTransport(self, **kwargs)

    def async_transport(self, **kwargs: Any) -> AsyncMeshTransport:
        kwargs.setdefault("local_responses", self.local_responses)
        return AsyncMeshTransport(self, **kwargs)

    def client(self, **options: Unpack[ClientOptions]) -> MeshClient:
        """An ``httpx.Client`` calling through the mesh: a ``MeshClient``, which tells the mesh
        which calls are streamed (their deadline ends at the headers). ``options`` are
        ``httpx.Client``'s keyword arguments (:class:`ClientOptions`). TLS (verify, cert), pool
        limits, http1/http2 and trust_env go to the inner transport, where httpx would
        otherwise drop them; everything else (timeout, headers, base_url, ...) to the client."""
        kwargs: dict[str, Any] = dict(options)
        inner = {k: kwargs.pop(k) for k in _TRANSPORT_ARGS if k in kwargs}
        local = kwargs.pop("local_responses", self.local_responses)
        return MeshClient(
            transport=MeshTransport(self, local_responses=local, **inner),
            **_client_args(kwargs, inner),
        )

    def async_client(self, **options: Unpack[ClientOptions]) -> AsyncMeshClient:
        """An ``httpx.AsyncClient`` calling through the mesh; see :meth:`client`."""
        kwargs: dict[str, Any] = dict(options)
        inner = {k: kwargs.pop(k) for k in _TRANSPORT_ARGS if k in kwargs}
        local = kwargs.pop("local_responses", self.local_responses)
        return AsyncMeshClient(
            transport=AsyncMeshTransport(self, local_responses=local, **inner),
            **_client_args(kwargs, inner),
        )

    # -- run-time faults (meshlib.testing) --------------------------------------------------------

    def inject_fault(
        self,
        service: str,
        *,
        abort: int | None = None,
        delay: float | None = None,
        refuse: bool = False,
        percent: float = 100.0,
        headers: Mapping[str, str] | None = None,
        route: str | None = None,
    ) -> FaultHandle:
        """Add a fault for calls to ``service`` until the handle is removed."""
        key = service if "." in service else f"{service}.{self.namespace}"
        services = self._router.services
        if key not in services:
            raise ValueError(_unknown_service(service, self.namespace, services))
        rule = FaultRule(
            name=f"runtime-{next(_versions)}",
            namespace=key.split(".", 1)[1],
            target=PolicyTarget(service=key, route=route),
            delay=DelayFault(delay, percent) if delay is not None else None,
            abort=AbortFault(abort, percent) if abort is not None else None,
            headers={k.lower(): v for k, v in (headers or {}).items()},
            refuse_percent=percent if refuse else 0.0,
        )
        with self._lock:
            self._faults = (*self._faults, rule)
            self._fault_index = {}
        return FaultHandle(self, rule)

    def _remove_fault(self, rule: FaultRule) -> None:
        with self._lock:
            self._faults = tuple(f for f in self._faults if f is not rule)
            self._fault_index = {}

    def extra_faults(self, service_key: str, route: str | None) -> tuple[FaultRule, ...]:
        faults = self._faults
        if not faults:
            return ()
        key = (service_key, route)
        index = self._fault_index
        found = index.get(key)
        if found is None:
            found = tuple(
                f
                for f in faults
                if f.target.service == service_key
                and (f.target.route is None or f.target.route == route)
            )
            index[key] = found
        return found

    # -- reload ---------------------------------------------------------------------------------

    def apply(self, snapshot: Snapshot) -> None:
        """Swap in a new validated snapshot atomically (calls in flight keep theirs).

        A snapshot whose version is not above the one in force (``load_text`` defaults to 0)
        is given the next version first: destinations adopt a snapshot by comparing versions,
        so an older number would leave them on the previous policy."""
        if snapshot.version <= self._router.snapshot.version:
            snapshot = dataclasses.replace(snapshot, version=next(_versions))
        self._router = Router(snapshot)  # a single reference assignment: atomic
        self.reload_status = ReloadStatus(True, snapshot.version, digest=snapshot.digest)
        self._sync_observers()

    def update_policy(self, sources: Sequence[tuple[str, str]], *, origin: str) -> str | None:
        """Load the named texts as one policy and apply it (the registry's versions come this
        way); a refused policy keeps the last good one in force, is counted and logged, and
        its error text is returned (the registry hears it as a NACK)."""
        from meshlib.config.loader import load_texts

        try:
            snapshot = load_texts(sources, version=next(_versions))
        except ConfigError as error:
            self.reload_status = ReloadStatus(
                False, self.snapshot.version, error=error, at=time.time()
            )
            self.last_rejected = self.reload_status
            if self.metrics is not None:
                self.metrics.reloads.labels("rejected").inc()
            log.error(
                "policy %s rejected, keeping version %d: %s", origin, self.snapshot.version, error
            )
            return str(error)
        if snapshot.digest == self.snapshot.digest:
            return None
        self.apply(snapshot)
        if self.metrics is not None:
            self.metrics.reloads.labels("applied").inc()
        log.info("policy applied: version %d from %s", snapshot.version, origin)
        return None

    def _sync_observers(self) -> None:
        """Follow ``spec.accessLog`` (or the ``access_log`` argument) at start and on reload."""
        if self._access_log or self.snapshot.mesh.access_log or self.events is not None:
            from meshlib.observe.accesslog import sync_access_log

            sync_access_log(self, self._access_log)

    def admin_app(self, *, tap_size: int = 1000, top_window: float = 60.0) -> AdminApp:
        """A read-only ASGI debug app for this mesh (meshlib.observe.admin): serve it on a
        localhost-only admin port, never on the public listener."""
        from meshlib.observe.admin import AdminApp

        return AdminApp(self, tap_size=tap_size, top_window=top_window)

    def reload(self) -> bool:
        """Re-read the policy files now (a directory's listing too). A bad file keeps the last
        good snapshot in force."""
        if not self._paths:
            raise RuntimeError("this mesh was not loaded from a file")
        with self._reload_lock:  # the watcher and an explicit call must not interleave
            return self._reload(self._paths)

    def _reload(self, paths: tuple[Path, ...]) -> bool:
        from meshlib.config.loader import ReadCache, load_paths

        if self._read_cache is None:
            self._read_cache = ReadCache()
        try:
            snapshot = load_paths(paths, version=next(_versions), cache=self._read_cache)
        except (ConfigError, OSError) as exc:
            error = (
                exc
                if isinstance(exc, ConfigError)
                else ConfigError.from_message(str(paths[0]), str(exc))
            )
            self.reload_status = ReloadStatus(
                False,
                self.snapshot.version,
                error=error,
                digest=_files_digest(paths),
                at=time.time(),
            )
            self.last_rejected = self.reload_status
            if self.metrics is not None:
                self.metrics.reloads.labels("rejected").inc()
            log.error(
                "policy reload rejected, keeping version %d: %s", self.snapshot.version, error
            )
            return False
        if snapshot.digest == self.snapshot.digest:
            if not self.reload_status.ok:  # back to the content in force: no error any more
                self.reload_status = ReloadStatus(
                    True, self.snapshot.version, digest=snapshot.digest, at=time.time()
                )
            return True
        self.apply(snapshot)
        if self.metrics is not None:
            self.metrics.reloads.labels("applied").inc()
        log.info(
            "policy reloaded: version %d from %s", snapshot.version, ", ".join(map(str, paths))
        )
        return True

    def _watch(self) -> None:
        """Poll the files; reload once their stat has been stable for one interval, so a file
        written in pieces is read whole (a rename is atomic and settles at once). Every file
        is polled, so a change to several files that settles within one interval is one
        reload."""
        seen = self._watched
        while not self._stop.wait(self._poll_interval):
            current = _policy_stat(self._paths)
            if current is None or current == seen:
                continue
            if self._stop.wait(self._poll_interval):
                return
            if _policy_stat(self._paths) != current:
                continue  # still being written: wait for it to settle
            seen = current
            try:
                self.reload()
            except Exception:  # the watcher must outlive any bug in one reload
                log.exception("policy reload failed unexpectedly")

    # -- lifetime -------------------------------------------------------------------------------

    @property
    def svid_status(self) -> RotationStatus | None:
        """The SVID rotation state (expiry, renewal time, last reload, last error); ``None``
        without ``svid_dir`` or with ``svid_poll_interval=None``."""
        return None if self._rotation is None else self._rotation.status

    def _set_cert_expiry(self, material: SVIDMaterial) -> None:
        if self.metrics is not None:
            expiry = material.certificate.not_valid_after_utc.timestamp()
            self.metrics.set_cert_expiry(str(material.spiffe_id), expiry)

    @property
    def renewer(self) -> Renewer | None:
        """The running SVID renewer (its ``status``: renewals, failures, last error), if any."""
        return self._renewer

    def start_renewal(self, issuer: Issuer, **options: Any) -> Renewer:
        """Renew this mesh's SVID from ``issuer`` (e.g. ``LocalIssuer(ca_dir)``) at half-life,
        retrying while it is unavailable; each renewed pair is loaded at once. ``options``
        go to :class:`meshlib.identity.renewal.Renewer`; :meth:`close` stops it."""
        from meshlib.identity.renewal import Renewer

        if self.svid is None:
            raise RuntimeError("renewal needs an SVID: create the mesh with svid_dir")
        if self._renewer is not None:
            raise RuntimeError("renewal is already running for this mesh")
        options.setdefault("metrics", self.metrics)
        options.setdefault("on_renewed", self._load_renewed)
        self._renewer = Renewer(self.svid, issuer, **options).start()
        return self._renewer

    def _load_renewed(self, _svid: object) -> None:
        """Swap a renewed pair in now; raise if it is refused (the renewer then retries)."""
        assert self.svid is not None
        if self._rotation is None:
            self.svid.reload()
            return
        self._rotation.check()
        if self._rotation.status.last_error is not None:
            raise RuntimeError(f"renewed SVID refused: {self._rotation.status.last_error}")

    # -- the registry ---------------------------------------------------------------------------

    def register(
        self,
        address: str,
        port: int,
        *,
        labels: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        ttl: float | None = None,
    ) -> RegistrationHandle:
        """Register ``address:port`` as an instance of this mesh's service, kept alive by
        heartbeats in the background; the handle's ``close()`` drains it (DESIGN.md §8).
        Needs a mesh made by :meth:`from_registry`."""
        if self._agent is None:
            raise RuntimeError(
                f"mesh {self.source}: no registry to register with (use Mesh.from_registry)"
            )
        return self._agent.register(
            self.namespace,
            self.service,
            address,
            port,
            labels=labels,
            metrics_port=metrics_port,
            ttl=ttl,
        )

    def on_serving(self, host: str, port: int, scheme: str) -> RegistrationHandle | None:
        """:func:`meshlib.serve`'s hook: register the served instance (its stop drains it
        first, while the port still accepts). Without a registry: nothing."""
        if self._agent is None:
            return None
        if host in ("0.0.0.0", "::", ""):
            raise ValueError(
                f"serve: host {host!r} is no address callers can reach: pass advertise= "
                "the address to register"
            )
        labels, metrics_port = self._served_as
        return self.register(host, port, labels=labels, metrics_port=metrics_port)

    def registry_status(self) -> dict[str, Any] | None:
        """The registry link's state for /status (None without a registry)."""
        return None if self._agent is None else self._agent.status()

    def close(self) -> None:
        if self._agent is not None:
            self._agent.close()  # drains what is still registered, while calls still work
        if self._renewer is not None:
            self._renewer.stop()
        if self._rotation is not None:
            self._rotation.stop()
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        if self.events is not None:
            self.events.close()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


#: httpx.Client arguments that really configure the transport.
_TRANSPORT_ARGS = ("verify", "cert", "limits", "http1", "http2", "trust_env", "retries", "proxy")


def _env_labels(text: str) -> dict[str, str]:
    """``MESHLIB_LABELS``: ``key=value`` pairs separated by commas."""
    labels: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(
                f"Mesh.from_env: MESHLIB_LABELS item {item.strip()!r} is not key=value "
                "(write e.g. version=v2,zone=a)"
            )
        labels[key.strip()] = value.strip()
    return labels


def _client_args(kwargs: dict[str, Any], inner: Mapping[str, Any]) -> dict[str, Any]:
    # trust_env also affects the client's own behaviour (netrc, env proxies): give it to both.
    if "trust_env" in inner:
        kwargs["trust_env"] = inner["trust_env"]
    return kwargs


def _unknown_service(service: str, namespace: str, services: Mapping[str, object]) -> str:
    """``unknown service 'ratingz' (did you mean 'ratings'?); known services: ...``: names in
    the mesh's own namespace are shown short, as a test would write them; the suggestion is
    the one a mistyped host gets (:func:`close_service`)."""
    suffix = f".{namespace}"
    known = sorted(k.removesuffix(suffix) if k.endswith(suffix) else k for k in services)
    close = close_service(service, services, namespace)
    hint = "" if close is None else f" (did you mean {close!r}?)"
    listed = ", ".join(known[:_LISTED]) if known else "none (the policy declares no Service)"
    if len(known) > _LISTED:
        listed += f", ... ({len(known) - _LISTED} more)"
    return f"unknown service {service!r}{hint}; known services: {listed}"


#: Known services named in an unknown-service error; a large mesh gets a count for the rest.
_LISTED = 20


def _policy_paths(path: PolicyPaths) -> tuple[Path, ...]:
    paths = (path,) if isinstance(path, (str, os.PathLike)) else tuple(path)
    if not paths:
        raise ValueError("Mesh.from_file: no policy file or directory given")
    return tuple(Path(p) for p in paths)


def _policy_stat(paths: Sequence[Path]) -> tuple[tuple[str, int, int, int], ...] | None:
    """What the watcher compares: each policy file's name, mtime, size and inode, a
    directory's files as it lists them now (so a file added or removed is a change).
    None while a named file or directory is missing: like one file, it is waited for."""
    from meshlib.config.loader import directory_policy_files

    seen: list[tuple[str, int, int, int]] = []
    for path in paths:
        try:
            st = os.stat(path)
            if not stat.S_ISDIR(st.st_mode):
                seen.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
                continue
            files = directory_policy_files(str(path))
        except (OSError, ConfigError):
            return None
        for file in files:
            try:
                st = os.stat(file)
            except OSError:
                continue  # removed since the listing: the next poll lists it gone
            seen.append((file, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(seen)


def _files_digest(paths: Sequence[Path]) -> str | None:
    """sha256 of the policy files' bytes, joined by NUL as the loader joins them (its digest
    for UTF-8 files: one file's is its bytes' own); None if a file or directory is unreadable."""
    from meshlib.config.loader import policy_files

    digest = hashlib.sha256()
    try:
        for i, file in enumerate(policy_files(paths)):
            if i:
                digest.update(b"\0")
            digest.update(Path(file).read_bytes())
    except (OSError, ConfigError):
        return None
    return digest.hexdigest()


def _egress_refused(
    request: httpx.Request, version: int, suggest: Callable[[str], str | None]
) -> AccessDeniedError:
    host = request.url.host
    decision = Decision(host, version, reason="denied", status=AccessDeniedError.status)
    close = suggest(host)
    hint = "" if close is None else f"; did you mean {close!r}?"
    return AccessDeniedError(
        f"egress to {host!r} refused: not a mesh service (egress: registry-only){hint}",
        decision=decision,
    )


if TYPE_CHECKING:

    def _wiring(mesh: Mesh, metrics: MeshMetrics) -> tuple[InboundHost, ServedMesh, RenewalMetrics]:
        """The mesh is the host the middleware and ``serve`` declare, and its metrics what the
        renewer reports to: checked by mypy here, where they are handed over by the user or
        through ``**options`` (the other parts are built in this module and checked there)."""
        hook: ServingHook = mesh  # serve registers through it
        del hook
        return mesh, mesh, metrics
