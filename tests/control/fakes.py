"""Test doubles for the control plane's client: a DiscoverySource over the registry's real
pure core, answering blocking queries in memory (no sockets)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from policy.fakes import FakeClock

from meshlib.control.discovery import SourceUnavailable
from meshlib.control.registry import Registry
from meshlib.control.wire import EndpointsAnswer, PolicyAnswer, RegisteredEndpoint

WORKLOAD = "spiffe://cluster.local/ns/default/sa/reviews"


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
