"""One inner transport (one connection pool) per endpoint for the mesh's transports, built on
first use and bounded: past :data:`MAX_POOLS`, the least recently used idle ones are closed.

Why per endpoint: httpcore 1.0 scans every connection of a pool on each request (an expiry
poll of each socket and an O(n²) idle count, encode/httpcore#924), so with one shared pool a
call's cost grows with every connection the client holds to any endpoint of any service.
With a pool per endpoint a call scans only the connections to its own endpoint, as Envoy's
per-host pools do; ``httpx.Limits`` then bound each endpoint, not the client.

A pool is *leased* for the time its transport's ``handle_request`` runs and counts as busy
while any of its connections is not idle (a response still being read), so closing a pool
never cuts a request: only pools with neither are closed. The pools kept past the cap are busy
ones, at most one per request in flight.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["MAX_POOLS", "EndpointPools", "Pool", "PoolKey", "quiet"]

#: Pools kept per mesh transport (endpoints it has called recently, mTLS and plain apart).
MAX_POOLS = 256

#: (over mesh mTLS, the endpoint's ``host:port``): where an attempt is sent.
PoolKey = tuple[bool, str]

T = TypeVar("T")


def quiet(transport: object) -> bool:
    """Whether no connection of ``transport``'s httpcore pool is in use. httpx keeps the pool
    in the private ``_pool`` (meshlib.identity.pinned relies on it too): an httpx transport
    without it raises rather than count as quiet, since closing it could cut a response still
    being read (tests/outbound/test_pools.py checks httpx still keeps it). Any other transport
    has no connection meshlib can see, so it counts as quiet."""
    import httpcore  # here: httpcore loads anyio, and `import meshlib` must not (issue 15)
    import httpx

    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.ConnectionPool | httpcore.AsyncConnectionPool):
        if isinstance(transport, httpx.HTTPTransport | httpx.AsyncHTTPTransport):
            raise RuntimeError(
                "httpx's transports no longer keep their pool in _pool; meshlib cannot tell "
                "whether an endpoint's pool is in use"
            )
        return True
    return all(connection.is_idle() for connection in pool.connections)


class Pool(Generic[T]):
    """One endpoint's transport and the requests being handed to it now."""

    __slots__ = ("leases", "transport")

    def __init__(self, transport: T) -> None:
        self.transport = transport
        # One item per lease: append and pop are atomic, so a release needs no lock (an
        # eviction that reads a lease about to end only keeps the pool a little longer).
        self.leases: list[None] = []


class EndpointPools(Generic[T]):
    """The transports of one mesh transport, per :data:`PoolKey`. Thread-safe: the sync
    transport's hedges and mirrors lease from other threads. Closing (sync ``close`` or async
    ``aclose``) is the caller's, on what :meth:`lease` evicts and :meth:`drain` hands back."""

    def __init__(
        self,
        build: Callable[[PoolKey], T],
        cap: int | None = None,
        is_quiet: Callable[[T], bool] = quiet,
    ) -> None:
        cap = MAX_POOLS if cap is None else cap
        if cap < 1:
            raise ValueError(f"EndpointPools: cap must be at least 1, got {cap}")
        self._build = build
        self._cap = cap
        self._is_quiet = is_quiet
        self._pools: OrderedDict[PoolKey, Pool[T]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pools)

    def items(self) -> list[tuple[PoolKey, T]]:
        """The endpoints with a pool and their transports, least recently used first."""
        with self._lock:
            return [(key, entry.transport) for key, entry in self._pools.items()]

    def lease(self, key: PoolKey) -> tuple[Pool[T], list[T]]:
        """The pool for ``key`` (built if new), leased until :meth:`release`, and the pools
        evicted to stay within the cap, for the caller to close (outside any lock)."""
        # acquire/release rather than a with-block: a context manager's enter and exit are
        # two more calls on every attempt's path (≈ 0.6k instructions per call)
        lock = self._lock
        lock.acquire()
        try:
            entry = self._pools.get(key)
            if entry is not None:
                self._pools.move_to_end(key)
                entry.leases.append(None)
                return entry, []
            entry = self._pools[key] = Pool(self._build(key))
            entry.leases.append(None)  # before evicting: the new pool is never closed
            return entry, self._evict() if len(self._pools) > self._cap else []
        finally:
            lock.release()

    @staticmethod
    def release(entry: Pool[T]) -> None:
        entry.leases.pop()

    def _evict(self) -> list[T]:
        """Remove least recently used pools that are neither leased nor holding a connection
        in use, until the cap holds again or only busy pools are left."""
        excess = len(self._pools) - self._cap
        victims: list[PoolKey] = []
        for key, entry in self._pools.items():
            if len(victims) == excess:
                break
            if not entry.leases and self._is_quiet(entry.transport):
                victims.append(key)
        return [self._pools.pop(key).transport for key in victims]

    def drain(self) -> list[T]:
        """Every pool, removed, for the transport's close."""
        with self._lock:
            transports = [entry.transport for entry in self._pools.values()]
            self._pools.clear()
            return transports
