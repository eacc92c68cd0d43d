"""A workload's link to the registry: what :meth:`meshlib.Mesh.from_registry` starts with (the
registry's policy, else the cache file's, else the local floor), and, while it runs, discovery
(policy and endpoints in), the registrar (instances and the policy ACK/NACK out) and the cache
file, wired to the mesh through narrow protocols.

The rules live in the parts (:mod:`~meshlib.control.discovery`, :mod:`~meshlib.control.registrar`,
:mod:`~meshlib.control.cache`); this module only composes them and adapts the HTTP client to the
two protocols they take, so each part stays testable without the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from meshlib.config.loader import policy_files, read_policy_file
from meshlib.config.model import Endpoint, Snapshot
from meshlib.control.cache import CachedState, CacheFile
from meshlib.control.client import (
    AsyncRegistryClient,
    Registered,
    RegistryClient,
    RegistryError,
    RegistryNotFound,
    RegistryUnavailable,
    RegistryURLs,
)
from meshlib.control.discovery import (
    Discovery,
    DiscoveryState,
    ServiceState,
    SourceUnavailable,
    split_key,
)
from meshlib.control.loop import LoopThread
from meshlib.control.registrar import (
    InstanceNotFound,
    PolicyReport,
    Registrar,
    RegistrationHandle,
    RegistrationUnavailable,
)
from meshlib.control.trust import BundleNotServed, BundleWatcher
from meshlib.control.wire import BundleAnswer, EndpointsAnswer, PolicyAnswer
from meshlib.errors import ConfigError
from meshlib.identity.tls import SVIDSource

__all__ = [
    "RegistryAgent",
    "RegistrySide",
    "Start",
    "cache_path",
    "policy_sources",
    "starting_point",
]

log = logging.getLogger("meshlib.control")

#: Seconds :meth:`Mesh.from_registry` waits for the registry's policy before it starts from the
#: cache file (or the local floor): a registry that is down must not stall a start-up.
STARTUP_TIMEOUT = 3.0

Sources = list[tuple[str, str]]


class RegistrySide(Protocol):
    """What the agent needs from the mesh (:class:`meshlib.Mesh`)."""

    @property
    def snapshot(self) -> Snapshot: ...

    def set_endpoints(
        self, service_key: str, endpoints: tuple[Endpoint, ...], *, authoritative: bool = True
    ) -> None: ...

    def update_policy(self, sources: Sequence[tuple[str, str]], *, origin: str) -> str | None:
        """Load ``sources`` as one policy and apply it; the error text if it is refused."""
        ...


class RegistryMetrics(Protocol):
    """Where the agent reports (:class:`meshlib.observe.metrics.MeshMetrics`)."""

    def track_registry(
        self, registry: str, up: Callable[[], bool], staleness: Callable[[], float]
    ) -> None: ...

    def set_policy_version(self, state: str, version: int) -> None: ...


def registry_source(version: int) -> str:
    """The source name a registry policy version carries in error messages."""
    return f"registry policy v{version}"


def policy_sources(answer_text: str, version: int, local: Sequence[str]) -> Sources:
    """The named texts of one policy: the registry's version (if any) and the local files
    (a directory: its policy files, listed again), re-read now. Raises ConfigError for an
    unreadable local file."""
    sources: Sources = []
    if answer_text.strip():
        sources.append((registry_source(version), answer_text))
    for path in policy_files(local):
        sources.append((path, read_policy_file(path)))
    return sources


def floor_policy(trust_domain: str) -> Sources:
    """The policy of a workload that has nothing else yet: the mesh settings only, in the
    SVID's trust domain (so its own certificate stays valid under it)."""
    text = (
        "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: mesh}\n"
        f"spec: {{trustDomain: {trust_domain}}}\n"
    )
    return [("<no policy yet>", text)]


def cache_path(cache_dir: str | os.PathLike[str] | None, namespace: str, service: str) -> Path:
    """The cache file of ``service.namespace``: in ``cache_dir``, else ``$MESHLIB_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/meshlib`` (``~/.cache/meshlib``)."""
    if cache_dir is None:
        cache_dir = os.environ.get("MESHLIB_CACHE_DIR") or None
    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache_dir = os.path.join(base, "meshlib")
    return Path(cache_dir) / f"registry-{namespace}-{service}.json"


@dataclass(frozen=True)
class Start:
    """Where a registry-backed mesh starts: its first snapshot and discovery's seed."""

    snapshot: Snapshot
    #: Discovery's seed: the chosen policy version and the endpoints known at start.
    initial: DiscoveryState | None
    #: ``registry``, ``cache`` or ``local`` (nothing from either): for the log and /status.
    origin: str
    #: The registry's version this workload refused at start (its NACK), with the error.
    rejected: tuple[int, str] | None = None


#: At most this many services' endpoints are fetched before start-up returns (the rest arrive
#: through the watches): a first call right after start finds its endpoints.
STARTUP_SERVICES = 64


def starting_point(
    url: str | Sequence[str] | RegistryURLs,
    *,
    svid_dir: str,
    local: Sequence[str],
    cache: CacheFile | None,
    trust_domain: str,
    load: Callable[[Sources], Snapshot],
    timeout: float = STARTUP_TIMEOUT,
) -> Start:
    """Ask the registry for its policy, and for the endpoints of the services it declares, all
    bounded by ``timeout``; load it with the local files (``load`` raises ConfigError).
    Refused or unreachable: the cache file's policy and endpoints, else the local files alone,
    else the floor (CONTROL-PLANE.md §5). The snapshot is loaded once, here."""
    cached: CachedState | None = cache.load() if cache is not None else None
    services = dict(cached.state.services) if cached is not None else {}
    rejected: tuple[int, str] | None = None
    deadline = time.monotonic() + timeout
    try:
        with RegistryClient(url, svid_dir=svid_dir, timeout=timeout) as client:
            answer = client.policy(index=0)
            try:
                snapshot = load(
                    policy_sources(answer.text, answer.version, local)
                    or _floor(local, trust_domain)
                )
            except ConfigError as exc:
                rejected = (answer.version, str(exc))
                log.error("registry policy v%d refused at start: %s", answer.version, exc)
            else:
                for key in list(snapshot.services)[:STARTUP_SERVICES]:
                    client.timeout = max(0.1, deadline - time.monotonic())
                    namespace, name = split_key(key)
                    found = client.endpoints(namespace, name)
                    endpoints = tuple(e.endpoint() for e in found.endpoints)
                    services[key] = ServiceState(found.index, found.epoch, endpoints)
                initial = DiscoveryState(answer.epoch, answer.version, answer.text, services)
                return Start(snapshot, initial, "registry")
    except RegistryError as exc:
        where = ",".join(url.urls) if isinstance(url, RegistryURLs) else url
        log.warning("registry %s unreachable at start (%s): starting from the cache", where, exc)
    if cached is not None and cached.state.policy_version > 0:
        state = cached.state
        try:
            snapshot = load(policy_sources(state.policy_text, state.policy_version, local))
        except ConfigError as exc:
            log.error("cached policy v%d refused at start: %s", state.policy_version, exc)
        else:
            return Start(snapshot, replace(state, services=services), "cache", rejected)
    seed = DiscoveryState(cached.state.epoch, 0, "", services) if cached is not None else None
    return Start(load(_floor(local, trust_domain)), seed, "local", rejected)


def _floor(local: Sequence[str], trust_domain: str) -> Sources:
    return policy_sources("", 0, local) or floor_policy(trust_domain)


class ClientSource:
    """Discovery's :class:`~meshlib.control.discovery.DiscoverySource` over the HTTP client:
    every failure is "unavailable" to discovery, which keeps the last state and backs off."""

    def __init__(self, client: AsyncRegistryClient) -> None:
        self.client = client

    async def endpoints(
        self, namespace: str, service: str, *, index: int, wait: float, epoch: str = ""
    ) -> EndpointsAnswer:
        with _unavailable():
            return await self.client.endpoints(
                namespace, service, index=index, wait=wait, epoch=epoch or None
            )

    async def policy(self, *, index: int, wait: float, epoch: str = "") -> PolicyAnswer:
        with _unavailable():
            return await self.client.policy(index=index, wait=wait, epoch=epoch or None)

    async def bundle(self, *, index: int, wait: float, epoch: str = "") -> BundleAnswer:
        """The trust watcher's :class:`~meshlib.control.trust.BundleSource`."""
        try:
            with _unavailable():
                return await self.client.bundle(index=index, wait=wait, epoch=epoch or None)
        except SourceUnavailable as exc:
            if isinstance(exc.__cause__, RegistryNotFound):
                raise BundleNotServed(
                    f"the registry at {self.client.url} serves no bundle"
                ) from exc
            raise


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except RegistryUnavailable as exc:
        raise SourceUnavailable(str(exc), exc.retry_after) from exc
    except RegistryError as exc:  # a 403 or 404 too: keep the last state, retry later
        raise SourceUnavailable(f"registry refused the watch: {exc}") from exc


class ClientRegistration:
    """The registrar's :class:`~meshlib.control.registrar.RegistrationAPI` over the client."""

    def __init__(self, client: AsyncRegistryClient) -> None:
        self.client = client

    async def register(
        self,
        namespace: str,
        service: str,
        instance_id: str,
        address: str,
        port: int,
        labels: Mapping[str, str],
        metrics_port: int | None,
        ttl: float | None,
    ) -> Registered:
        with _registration_errors():
            return await self.client.register(
                namespace, service, address, port, labels=labels, metrics_port=metrics_port, ttl=ttl
            )

    async def heartbeat(
        self, namespace: str, service: str, instance_id: str, report: PolicyReport
    ) -> None:
        with _registration_errors():
            await self.client.heartbeat(
                namespace,
                service,
                instance_id,
                applied_version=report.applied_version,
                rejected_version=report.rejected_version,
                error=report.error,
            )

    async def deregister(self, namespace: str, service: str, instance_id: str) -> None:
        with _registration_errors():
            await self.client.deregister(namespace, service, instance_id)


@contextlib.contextmanager
def _registration_errors() -> Iterator[None]:
    try:
        yield
    except RegistryNotFound as exc:
        raise InstanceNotFound(str(exc)) from exc
    except RegistryUnavailable as exc:
        raise RegistrationUnavailable(str(exc), exc.retry_after) from exc
    except RegistryError as exc:  # 400/403: retried with back-off, and loudly
        log.error("registry refused a registration: %s", exc)
        raise RegistrationUnavailable(str(exc)) from exc


class RegistryAgent:
    """Discovery, the registrar and the cache of one registry-backed mesh.

    ``mesh`` receives endpoints (:meth:`RegistrySide.set_endpoints`) and policies
    (:meth:`RegistrySide.update_policy`); every service the applied policy declares is
    watched. ``local`` files are added to each registry version, re-read each time.
    """

    def __init__(
        self,
        url: str | Sequence[str] | RegistryURLs,
        mesh: RegistrySide,
        *,
        svid_dir: str,
        local: Sequence[str] = (),
        cache: CacheFile | None = None,
        start: Start | None = None,
        metrics: RegistryMetrics | None = None,
        wait: float | None = None,
        source: SVIDSource | None = None,
    ) -> None:
        # The mesh's own SVID source when it has one: rotation reloads it, so the registry
        # connections present a renewed SVID as soon as it is on disk.
        credentials: dict[str, Any] = (
            {"source": source} if source is not None else {"svid_dir": svid_dir}
        )
        #: The registry URLs, shared by the three clients below (each on its own event loop):
        #: when one of them leaves a registry, every watch follows, and the move is logged once.
        self.registry = url if isinstance(url, RegistryURLs) else RegistryURLs(url)
        url = self.registry
        self._mesh = mesh
        self._local = tuple(local)
        self._metrics = metrics
        self._cache = cache
        self.origin = start.origin if start is not None else "local"
        options: dict[str, Any] = {} if wait is None else {"wait": wait}
        self.discovery = Discovery(
            ClientSource(AsyncRegistryClient(url, **credentials)),
            mesh,
            self,
            services=tuple(mesh.snapshot.services),
            initial=start.initial if start is not None else None,
            persist=cache.write if cache is not None else None,
            **options,
        )
        self._loop = LoopThread("meshlib-registry-link")
        self.registrar = Registrar(
            ClientRegistration(AsyncRegistryClient(url, **credentials)),
            report=self.report,
            loop=self._loop,
        )
        #: Writes the registry's trust bundle and CRLs into ``svid_dir`` for the mesh's
        #: rotation watcher (``meshctl ca rotate``/``revoke`` reach this workload).
        self.trust = BundleWatcher(
            ClientSource(AsyncRegistryClient(url, **credentials)),
            svid_dir,
            loop=self._loop,
            **options,
        )
        self._rejected = start.rejected if start is not None else None
        if metrics is not None:
            # Labelled by the whole list: the series stays one across a move between URLs.
            metrics.track_registry(
                ",".join(self.registry.urls), lambda: self.discovery.up, self.staleness
            )
            if start is not None and start.initial is not None:
                metrics.set_policy_version("applied", start.initial.policy_version)
            if self._rejected is not None:
                metrics.set_policy_version("rejected", self._rejected[0])

    @property
    def url(self) -> str:
        """The registry URL in use now."""
        return self.registry.url

    def start(self) -> RegistryAgent:
        self.discovery.start()
        self.trust.start()
        if self.origin == "registry" and self._cache is not None:
            # What start-up fetched is already applied: keep it even if nothing changes before
            # the next restart (discovery writes the file on changes only).
            try:
                self._cache.write(self.discovery.state())
            except OSError as exc:
                log.error("discovery: cache not written: %s", exc)
        return self

    # -- discovery's policy sink -------------------------------------------------------------

    def apply_policy(self, answer: PolicyAnswer) -> str | None:
        """Load the registry's version with the local files and apply it; the loader's error if
        this workload refuses it (the last good policy stays: the NACK goes out with the next
        heartbeat)."""
        try:
            sources = policy_sources(answer.text, answer.version, self._local)
        except ConfigError as exc:
            error: str | None = str(exc)
        else:
            error = self._mesh.update_policy(
                sources or floor_policy(self._mesh.snapshot.mesh.trust_domain),
                origin=registry_source(answer.version),
            )
        if error is not None:
            self._rejected = (answer.version, error)
            if self._metrics is not None:
                self._metrics.set_policy_version("rejected", answer.version)
            return error
        if self._metrics is not None:
            self._metrics.set_policy_version("applied", answer.version)
        for key in self._mesh.snapshot.services:
            self.discovery.watch(key)
        return None

    # -- the registrar's report ---------------------------------------------------------------

    def report(self) -> PolicyReport:
        """The policy ACK/NACK each heartbeat carries."""
        status = self.discovery.policy_status
        if status.rejected_version is not None and status.error is not None:
            return PolicyReport(status.applied_version, status.rejected_version, status.error)
        if status.applied_version is None and self._rejected is not None:
            return PolicyReport(None, self._rejected[0], self._rejected[1])
        return PolicyReport(status.applied_version)

    # -- state ----------------------------------------------------------------------------------

    def staleness(self) -> float:
        """Seconds since the registry last answered while it is away (0 while it answers)."""
        stale = self.discovery.stale_for()
        return 0.0 if stale is None else stale

    def status(self) -> dict[str, Any]:
        """For the admin app's /status."""
        state = self.discovery.state()
        report = self.report()
        return {
            # The registry URL in use now (the one every call goes to first), and the list.
            "url": self.registry.url,
            "urls": list(self.registry.urls),
            "up": self.discovery.up,
            "started_from": self.origin,
            "epoch": state.epoch,
            "staleness_seconds": self.discovery.stale_for(),
            "policy_version": state.policy_version,
            "policy_rejected": report.rejected_version,
            "policy_error": report.error,
            # Every watched service, with the index of its last answer (None: none yet).
            "services": {
                key: state.services[key].index if key in state.services else None
                for key in sorted(self.discovery.watched())
            },
            "instances": [repr(h) for h in self.registrar.handles],
            "trust": {
                "bundle_sequence": self.trust.sequence,
                "served": self.trust.served,
                "refused": self.trust.refused,
            },
        }

    def register(
        self,
        namespace: str,
        service: str,
        address: str,
        port: int,
        *,
        labels: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        ttl: float | None = None,
    ) -> RegistrationHandle:
        return self.registrar.add(
            namespace, service, address, port, labels=labels, metrics_port=metrics_port, ttl=ttl
        )

    def close(self) -> None:
        """Drain every registered instance (bounded), then stop watching."""
        try:
            self.trust.stop()
            self.registrar.close()
        finally:
            self._loop.stop()
            self.discovery.stop()
