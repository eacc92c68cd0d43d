"""A real registry for tests: ``meshctl registry init``'s data dir in tmp_path, the app over a
SQLite (or memory) store, served by meshlib's own ``serve`` on 127.0.0.1 as ``registry serve``
does: TLS only, a client certificate optional (the app refuses a caller without one on every
path but /healthz, /readyz and the token form of POST /v1/ca/sign), signing with ``DIR/ca``.

``registry`` is one running registry; ``registry_factory`` starts more (a restart on the same
data dir, an injected clock, a small blocking-query limit). Each yields a
:class:`RunningRegistry`: its URL, the data dir's paths, ``issue(ns, sa)`` for more workload
SVIDs, ``client(svid_dir)`` for a :class:`RegistryClient`, ``http(svid_dir)`` for a raw mTLS
httpx client and ``expire()`` for an expiry pass run on the app's loop (with an injected clock,
the 1 s tick is off). ``wrap`` puts a test's store wrapper (a failing one) between the app and
its store; ``metrics=True`` builds the app as ``registry serve`` does, with its /metrics.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from meshlib.cli.registry import (
    RegistryDir,
    RegistryServed,
    init_registry_dir,
    registry_with_metrics,
)
from meshlib.control.app import JoinTokens, RegistryApp
from meshlib.control.client import RegistryClient
from meshlib.control.memory import MemoryStore
from meshlib.control.registry import RegistrySettings
from meshlib.control.sqlite import SQLiteStore
from meshlib.control.store import Store
from meshlib.control.wire import SERVER_KEEP_ALIVE
from meshlib.identity.tls import SVIDSource
from meshlib.inbound.serving import Server, serve

TD = "shop.test"


class FakeClock:
    """The registry core's monotonic clock, moved by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RunningRegistry:
    dir: RegistryDir
    app: RegistryApp
    server: Server
    svids: Path
    _closers: list[Callable[[], None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def data(self) -> Path:
        return self.dir.path

    @property
    def trust_domain(self) -> str:
        return self.dir.trust_domain

    @property
    def admin_svid(self) -> Path:
        return self.dir.admin_svid

    def issue(self, namespace: str, service_account: str) -> Path:
        """A workload SVID dir for ``namespace``/``service_account`` from the registry's CA."""
        return self.dir.issue(
            namespace, service_account, self.svids / f"{namespace}.{service_account}"
        )

    def http(self, svid_dir: Path | None = None, **kwargs: Any) -> httpx.Client:
        """A raw httpx client presenting ``svid_dir``'s SVID (default: the admin's)."""
        context = SVIDSource(svid_dir or self.admin_svid).client_context()
        client = httpx.Client(base_url=self.url, verify=context, timeout=10.0, **kwargs)
        self._closers.append(client.close)
        return client

    def client(self, svid_dir: Path | None = None) -> RegistryClient:
        """A :class:`RegistryClient` with ``svid_dir``'s SVID (default: the admin's)."""
        client = RegistryClient(self.url, svid_dir=str(svid_dir or self.admin_svid))
        self._closers.append(client.close)
        return client

    def poll_ca(self) -> bool:
        """One poll of the CA dir on the app's own loop (the tick's); whether the index moved."""
        assert self.app.loop is not None

        async def poll() -> bool:
            return self.app.poll_ca()

        return asyncio.run_coroutine_threadsafe(poll(), self.app.loop).result(10)

    def expire(self) -> int:
        """One expiry pass on the app's own loop; how many instances expired."""
        assert self.app.loop is not None
        return asyncio.run_coroutine_threadsafe(self.app.expire(), self.app.loop).result(10)

    def stop(self) -> None:
        self.server.stop()  # the lifespan shutdown closes the store (and its lock)
        for close in self._closers:  # after: a query still held gets its answer first
            close()
        self._closers.clear()


StartRegistry = Callable[..., RunningRegistry]


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[StartRegistry]:
    running: list[RunningRegistry] = []
    count = iter(range(1000))

    def start(
        data: Path | None = None,
        *,
        store: str = "sqlite",
        clock: Callable[[], float] | None = None,
        wall: Callable[[], float] | None = None,
        settings: RegistrySettings | None = None,
        max_watchers: int = 10_000,
        seed: int = 11,
        wrap: Callable[[Store], Store] | None = None,
        metrics: bool = False,
        port: int = 0,
        ca: bool = True,
        join_tokens: JoinTokens | None = None,
        svid_poll: float | None = None,
    ) -> RunningRegistry:
        """Start a registry on ``data`` (default: a new dir, initialised); ``clock`` injected
        turns the 1 s expiry tick off (drive it with :meth:`RunningRegistry.expire`); ``wall``
        is the wall clock the store's times are written in; ``port`` (default: a free one) lets
        a restart come back at the URL its clients know; ``ca`` serves ``DIR/ca``'s bundle and
        CRLs (``GET /v1/ca/bundle``) and signs, as ``registry serve`` does; ``join_tokens`` is
        what the token form of POST /v1/ca/sign spends (default: the real ones, minted by POST
        /v1/tokens); ``svid_poll`` polls the registry's SVID dir (``DIR/registry``) every so
        many seconds, as ``registry serve`` does every second, so the CRLs the CA poll copies
        there reach the server's handshakes (default: off)."""
        if data is None:
            data = tmp_path / f"registry-{next(count)}"
        made = init_registry_dir(data, TD)
        kv: Store = SQLiteStore(data) if store == "sqlite" else MemoryStore()
        if wrap is not None:
            kv = wrap(kv)
        extra: dict[str, Any] = {} if clock is None else {"clock": clock, "tick": 3600.0}
        if wall is not None:
            extra["wall"] = wall
        options: dict[str, Any] = {
            "join_tokens": join_tokens,
            "settings": settings or RegistrySettings(warming=0.0),
            "rng": random.Random(seed),
            "max_watchers": max_watchers,
            "ca_dir": made.ca if ca else None,
            "svid_dir": made.registry_svid if ca else None,
            **extra,
        }
        app = (
            registry_with_metrics(
                kv, trust_domain=made.trust_domain, collector=CollectorRegistry(), **options
            )
            if metrics
            else RegistryApp(kv, trust_domain=made.trust_domain, **options)
        )
        server = serve(
            app,
            mesh=RegistryServed(made.trust_domain, app),
            svid_dir=str(made.registry_svid),
            mode="strict",
            client_cert="optional",  # as `registry serve`: the app refuses callers without one
            svid_poll_interval=svid_poll,
            port=port,
            timeout_keep_alive=SERVER_KEEP_ALIVE,  # as `registry serve`
        )
        svids = data.parent / f"{data.name}-svids"
        svids.mkdir(exist_ok=True)
        found = RunningRegistry(made, app, server, svids)
        running.append(found)
        return found

    yield start
    for each in running:
        each.stop()


@pytest.fixture
def registry(registry_factory: StartRegistry) -> RunningRegistry:
    return registry_factory()
