"""The registry's ``Store``: the small key-value protocol every store implements, its values and
its errors.

The protocol is etcd v3's, cut down to what the registry needs, so an etcd store maps each
method onto one gateway call (``/v3/kv/range``, ``/v3/kv/txn``, ``/v3/kv/deleterange``,
``/v3/lease/grant|keepalive|revoke``, ``/v3/watch``) and the Memory and SQLite stores behave as
etcd would. One contract suite (``tests/control/test_store_contract.py``) holds them to it.

Semantics every store keeps:

* **One revision per store**, an integer that starts at 0 (nothing written) and grows by one
  for each write that changes something. Every item and event carries the revision that wrote
  it (``mod_revision``). A write that changes nothing (deleting an absent key) takes no
  revision. Revoking a lease deletes all its keys in one revision, as etcd does, so several
  events may share a revision; events never go backwards.
* **Compare-and-set** with ``if_mod_rev``: the write happens only if the key's current
  ``mod_revision`` equals it (0 means "the key must not exist"); otherwise :class:`Conflict`,
  naming the key, the expected and the actual revision. Nothing is written on a conflict.
* **Leases**: ``grant(ttl)`` returns an id; a key put with ``lease=`` is deleted when the lease
  is revoked or expires; ``keepalive`` restarts the lease's TTL. An unknown, revoked or expired
  lease raises :class:`LeaseNotFound` from ``keepalive``, ``revoke`` and ``put(lease=)``.
* **Expiry is checked on every operation**, against the store's injected ``clock`` (monotonic
  seconds): before a method does anything, each lease whose deadline has passed is revoked
  (oldest deadline first). So no read ever returns a key of an expired lease, and a test moves
  time with a fake clock and no sleeps. :meth:`Store.expire` is that step and nothing else; the
  registry's driver calls it on a timer so watchers hear of expiries when no other traffic
  touches the store (an etcd store expires leases itself, and its ``expire`` does nothing).
* **Watch** ``watch(prefix, after_rev)`` yields, in revision order and without gaps, every
  event under ``prefix`` with a revision greater than ``after_rev``, then waits for more. The
  usual loop is ``rev, items = await store.range(p)`` then ``store.watch(p, rev)``. A store keeps
  a bounded history: when ``after_rev`` is older than it (or a slow watcher falls behind it),
  the iterator raises :class:`Compacted` carrying the oldest revision it can still resume
  after, and the caller lists again. Close the iterator (``contextlib.aclosing``) when done.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Compacted",
    "Conflict",
    "Event",
    "EventKind",
    "Item",
    "LeaseNotFound",
    "Put",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreLocked",
    "StoreUnavailable",
    "check_puts",
]

#: One put of :meth:`Store.put_all`: (key, value, if_mod_rev).
Put = tuple[str, bytes, int | None]


def check_puts(puts: Sequence[Put]) -> None:
    """Refuse a :meth:`Store.put_all` that names no key, an empty key or a key twice."""
    if not puts:
        raise ValueError("put_all needs at least one (key, value, if_mod_rev)")
    keys = [key for key, _, _ in puts]
    if not all(keys):
        raise ValueError("a store key must not be empty")
    if len(set(keys)) != len(keys):
        raise ValueError(f"put_all writes each key once, got {keys!r}")


class StoreError(Exception):
    """Something the registry's store refused or could not do.

    ::

        StoreError
        ├── Conflict        a compare-and-set lost: .key, .expected, .actual
        ├── LeaseNotFound   unknown, revoked or expired lease: .lease
        ├── Compacted       a watch asked for history the store no longer keeps: .revision
        ├── StoreLocked     another process owns the data dir: .path, .pid
        ├── StoreClosed     the store was closed
        └── StoreUnavailable no answer in time or no quorum: .operation, .reason
    """


class Conflict(StoreError):
    """A compare-and-set lost: ``key`` was at ``actual`` (0: absent), not ``expected``."""

    def __init__(self, key: str, expected: int, actual: int) -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        state = "absent" if actual == 0 else f"at mod_revision {actual}"
        want = "absent" if expected == 0 else f"at mod_revision {expected}"
        super().__init__(f"conflict on {key!r}: expected it {want}, it is {state}")


class LeaseNotFound(StoreError):
    """``lease`` was never granted, or was revoked, or expired."""

    def __init__(self, lease: int) -> None:
        self.lease = lease
        super().__init__(f"lease {lease} not found (never granted, revoked or expired)")


class Compacted(StoreError):
    """The history a watch asked for is gone; list again, then watch after ``revision`` or
    later (the oldest revision the store can still resume after)."""

    def __init__(self, revision: int, after_rev: int) -> None:
        self.revision = revision
        super().__init__(
            f"history after revision {after_rev} was compacted; the store keeps events after "
            f"revision {revision}: list again and watch from there"
        )


class StoreLocked(StoreError):
    """Another process (``pid``, None if unknown) holds the data dir's lock file ``path``."""

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"{path}: the registry data dir is in use by {holder}; one registry process owns "
            "a data dir (stop the other one, or use another --data dir)"
        )


class StoreClosed(StoreError):
    """The store was closed; its watches end with this error."""

    def __init__(self) -> None:
        super().__init__("the store is closed")


class StoreUnavailable(StoreError):
    """The store did not answer in time or has no quorum. A read can be retried; a write's
    outcome is unknown (it may have happened), so the caller retries it as a repeatable write
    or reports 503."""

    def __init__(self, operation: str, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(
            f"the store is unavailable for {operation}: {reason} (a read can be retried; a "
            "write may or may not have happened)"
        )


class EventKind(str, enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class Item:
    """A key as the store holds it; ``lease`` is None when the key has none."""

    key: str
    value: bytes
    mod_revision: int
    lease: int | None = None


@dataclass(frozen=True)
class Event:
    """One change: a put (``value`` the new value) or a delete (``value`` empty), written at
    ``mod_revision``."""

    kind: EventKind
    key: str
    value: bytes
    mod_revision: int


class Store(Protocol):
    """The registry's key-value store; semantics in the module docstring."""

    async def range(self, prefix: str) -> tuple[int, list[Item]]:
        """The store's revision and every key starting with ``prefix``, sorted by key."""
        ...

    async def put(
        self, key: str, value: bytes, *, lease: int | None = None, if_mod_rev: int | None = None
    ) -> int:
        """Write ``key``; returns the revision of the write. A put without ``lease`` detaches
        the key from any lease it had."""
        ...

    async def put_all(self, puts: Sequence[Put]) -> int:
        """Write every ``(key, value, if_mod_rev)`` of ``puts`` in one revision, atomically: if
        any compare fails, nothing is written and :class:`Conflict` names the first such key
        (in ``puts``' order). No leases (each key is detached from any it had); each key at
        most once. Returns the revision. (The registry writes a service's index and the
        instance record a registration moves it for as one write: one round trip, one
        revision.)"""
        ...

    async def delete(self, key: str, *, if_mod_rev: int | None = None) -> int:
        """Delete ``key``; returns the revision of the delete, or the current revision if the
        key was absent (nothing changed)."""
        ...

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (at least 1); returns its id."""
        ...

    async def keepalive(self, lease: int) -> None:
        """Restart ``lease``'s TTL from now."""
        ...

    async def revoke(self, lease: int) -> int:
        """End ``lease`` and delete its keys in one revision; returns the store's revision."""
        ...

    async def expire(self) -> int:
        """Revoke every lease whose deadline has passed; returns the store's revision."""
        ...

    def watch(self, prefix: str, after_rev: int) -> AsyncIterator[Event]:
        """Every event under ``prefix`` after ``after_rev``, then each new one as it happens."""
        ...

    async def close(self) -> None:
        """Release the store; pending watches end with :class:`StoreClosed`."""
        ...
