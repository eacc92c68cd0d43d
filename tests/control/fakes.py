"""Test doubles for the control plane: a DiscoverySource over the registry's real pure core,
answering blocking queries in memory (no sockets), and a store that forwards every call to a
real one (the base of the tests' failing, slow and racing store views)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence

from policy.fakes import FakeClock

from meshlib.control.discovery import SourceUnavailable
from meshlib.control.registry import Registry
from meshlib.control.store import Event, Item, Put, Store
from meshlib.control.wire import EndpointsAnswer, PolicyAnswer, RegisteredEndpoint

WORKLOAD = "spiffe://cluster.local/ns/default/sa/reviews"


def mesh_policy(trust_domain: str, *services: str, mtls: str = "strict") -> str:
    """A policy of one Mesh (``trust_domain``, ``mtls``) and one Service per name in
    ``services``, each bound to the service account of its own name (append more documents
    with ``"---\n..."``)."""
    docs = [
        "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: mesh}\n"
        f"spec: {{trustDomain: {trust_domain}, mtls: {mtls}}}\n"
    ]
    docs += [
        f"apiVersion: meshlib/v1\nkind: Service\nmetadata: {{name: {name}}}\n"
        f"spec: {{serviceAccount: {name}}}\n"
        for name in services
    ]
    return "---\n".join(docs)


class ForwardingStore:
    """A :class:`~meshlib.control.store.Store` that forwards every call to ``inner`` (a real
    store): a test's store view overrides only the calls it changes."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    async def range(self, prefix: str) -> tuple[int, list[Item]]:
        return await self.inner.range(prefix)

    async def put(
        self, key: str, value: bytes, *, lease: int | None = None, if_mod_rev: int | None = None
    ) -> int:
        return await self.inner.put(key, value, lease=lease, if_mod_rev=if_mod_rev)

    async def put_all(self, puts: Sequence[Put]) -> int:
        return await self.inner.put_all(puts)

    async def delete(self, key: str, *, if_mod_rev: int | None = None) -> int:
        return await self.inner.delete(key, if_mod_rev=if_mod_rev)

    async def grant(self, ttl: int) -> int:
        return await self.inner.grant(ttl)

    async def keepalive(self, lease: int) -> None:
        await self.inner.keepalive(lease)

    async def revoke(self, lease: int) -> int:
        return await self.inner.revoke(lease)

    async def expire(self) -> int:
        return await self.inner.expire()

    def watch(self, prefix: str, after_rev: int) -> AsyncIterator[Event]:
        return self.inner.watch(prefix, after_rev)

    async def close(self) -> None:
        await self.inner.close()


class MemorySource:
    """A DiscoverySource over the registry's real core: a blocking query holds on an asyncio
    event until :meth:`changed` (called from the test's thread) or its wait passes."""

    def __init__(self, registry: Registry, clock: FakeClock) -> None:
        self.registry = registry
        self.clock = clock
        self.lock = threading.Lock()
        self.queried = threading.Condition(self.lock)
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.failures: list[SourceUnavailable] = []
        self.queries: list[tuple[str, int]] = []
        self.waits: list[float] = []  # each query's wait, beside ``queries``

    def wait_queries(self, n: int, timeout: float = 5.0) -> None:
        with self.queried:
            assert self.queried.wait_for(lambda: len(self.queries) >= n, timeout), self.queries

    def changed(self) -> None:
        with self.lock:
            waiters, self.waiters = self.waiters, []
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def _hold(self, ready: Callable[[], bool], wait: float) -> None:
        while True:
            event = asyncio.Event()
            with self.lock:
                if ready():
                    return
                self.waiters.append((asyncio.get_running_loop(), event))
            try:
                await asyncio.wait_for(event.wait(), wait)
            except asyncio.TimeoutError:  # TimeoutError from 3.11 on
                return

    async def endpoints(
        self, namespace: str, service: str, *, index: int, wait: float, epoch: str = ""
    ) -> EndpointsAnswer:
        with self.lock:
            self.queries.append((f"{service}.{namespace}", index))
            self.waits.append(wait)
            self.queried.notify_all()
            if self.failures:
                raise self.failures.pop(0)
        if index > 0 and epoch in ("", self.registry.epoch):
            await self._hold(lambda: self.registry.changed_since(namespace, service, index), wait)
        with self.lock:
            e = self.registry.endpoints(namespace, service, self.clock())
        return EndpointsAnswer(
            e.namespace,
            e.service,
            e.index,
            e.epoch,
            e.authoritative,
            tuple(RegisteredEndpoint(i.id, i.address, i.port, dict(i.labels)) for i in e.instances),
        )

    async def policy(self, *, index: int, wait: float, epoch: str = "") -> PolicyAnswer:
        with self.lock:
            self.queries.append(("policy", index))
            self.waits.append(wait)
            self.queried.notify_all()
        log = self.registry.policy
        if index > 0 and epoch in ("", self.registry.epoch):
            await self._hold(lambda: log.changed_since(index), wait)
        with self.lock:
            current = log.current()
        if current is None:
            return PolicyAnswer(0, "", epoch=self.registry.epoch)
        return PolicyAnswer(current.version, current.text, epoch=self.registry.epoch)

    def register(self, port: int, service: str = "reviews") -> None:
        with self.lock:
            self.registry.register(
                "default", service, "127.0.0.1", port, identity=WORKLOAD, now=self.clock()
            )
        self.changed()
