"""The in-process store: the :class:`~meshlib.control.store.Store` state machine held in
memory, with an optional journal that makes it durable (the SQLite store is this store plus a
journal).

Every method runs to completion without awaiting, so on one event loop each write is atomic:
two tasks racing a compare-and-set cannot interleave between the compare and the set. A
journal, when given, records each change before it becomes visible; if the journal raises, the
change is not applied.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshlib.control.store import (
    Compacted,
    Conflict,
    Event,
    EventKind,
    Item,
    LeaseNotFound,
    Put,
    StoreClosed,
    check_puts,
)

__all__ = ["Journal", "JournalEntry", "MemoryStore", "State"]

#: How many revisions of history a store keeps for watches to resume from, by default
#: (etcd's recipe in CONTROL-PLANE.md compacts to the last 1000 revisions too).
DEFAULT_HISTORY = 1000


@dataclass(frozen=True)
class JournalEntry:
    """One write as a journal sees it: the store's ``revision`` after it, the ``events`` it
    emits, the keys it wrote (``items``) and removed (``deleted``), the leases it granted
    (id, ttl) or ended, and the bookkeeping a reopened store needs."""

    revision: int
    events: tuple[Event, ...] = ()
    items: tuple[Item, ...] = ()
    deleted: tuple[str, ...] = ()
    granted: tuple[tuple[int, int], ...] = ()
    revoked: tuple[int, ...] = ()
    compacted: int = 0
    next_lease: int = 1


class Journal(Protocol):
    """Where a durable store records each change before applying it."""

    def record(self, change: JournalEntry) -> None: ...


@dataclass
class State:
    """What a store starts from: a reopened durable store loads it from its file. Leases carry
    their TTL only; each restarts its full TTL when the store opens (see the SQLite store)."""

    revision: int = 0
    compacted: int = 0
    next_lease: int = 1
    items: list[Item] = field(default_factory=list)
    leases: dict[int, int] = field(default_factory=dict)
    history: list[Event] = field(default_factory=list)


@dataclass
class _Lease:
    ttl: int
    deadline: float
    keys: set[str] = field(default_factory=set)


class MemoryStore:
    """The :class:`~meshlib.control.store.Store` protocol in memory; ``clock`` drives lease
    expiry, ``history`` is how many revisions of events watches can resume from."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        history: int = DEFAULT_HISTORY,
        journal: Journal | None = None,
        state: State | None = None,
    ) -> None:
        if history < 1:
            raise ValueError(f"history must keep at least 1 revision, got {history}")
        state = state or State()
        self._clock = clock
        self._history_limit = history
        self._journal = journal
        self._revision = state.revision
        self._compacted = state.compacted
        self._next_lease = state.next_lease
        self._kv: dict[str, Item] = {item.key: item for item in state.items}
        now = clock()
        self._leases: dict[int, _Lease] = {
            lease: _Lease(ttl, now + ttl) for lease, ttl in state.leases.items()
        }
        for item in state.items:
            if item.lease is not None and item.lease in self._leases:
                self._leases[item.lease].keys.add(item.key)
        self._history: deque[Event] = deque(state.history)
        self._watchers: dict[int, _Watcher] = {}
        self._closed = False
        #: How many times a waiting watcher was woken: a change wakes only the watchers whose
        #: prefix it touches (the registry's mesh_registry_watch_wakeups_total counts these).
        self.wakeups = 0

    # -- the protocol -------------------------------------------------------------------

    async def range(self, prefix: str) -> tuple[int, list[Item]]:
        self._touch()
        items = [self._kv[k] for k in sorted(self._kv) if k.startswith(prefix)]
        return self._revision, items

    async def put(
        self, key: str, value: bytes, *, lease: int | None = None, if_mod_rev: int | None = None
    ) -> int:
        self._touch()
        if not key:
            raise ValueError("a store key must not be empty")
        self._compare(key, if_mod_rev)
        if lease is not None and lease not in self._leases:
            raise LeaseNotFound(lease)
        revision = self._revision + 1
        item = Item(key, bytes(value), revision, lease)
        self._apply(
            revision,
            events=(Event(EventKind.PUT, key, item.value, revision),),
            items=(item,),
        )
        return revision

    async def put_all(self, puts: Sequence[Put]) -> int:
        self._touch()
        check_puts(puts)
        for key, _, if_mod_rev in puts:
            self._compare(key, if_mod_rev)
        revision = self._revision + 1
        items = tuple(Item(key, bytes(value), revision) for key, value, _ in puts)
        self._apply(
            revision,
            events=tuple(Event(EventKind.PUT, i.key, i.value, revision) for i in items),
            items=items,
        )
        return revision

    async def delete(self, key: str, *, if_mod_rev: int | None = None) -> int:
        self._touch()
        self._compare(key, if_mod_rev)
        if key not in self._kv:
            return self._revision
        revision = self._revision + 1
        self._apply(revision, events=(Event(EventKind.DELETE, key, b"", revision),), deleted=(key,))
        return revision

    async def grant(self, ttl: int) -> int:
        self._touch()
        if not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"a lease TTL is a whole number of seconds >= 1, got {ttl!r}")
        lease = self._next_lease
        self._apply(self._revision, granted=((lease, ttl),), next_lease=lease + 1)
        return lease

    async def keepalive(self, lease: int) -> None:
        self._touch()
        held = self._leases.get(lease)
        if held is None:
            raise LeaseNotFound(lease)
        # Not journaled: a reopened store restarts every lease's full TTL anyway, so a
        # heartbeat costs no disk write.
        held.deadline = self._clock() + held.ttl

    async def revoke(self, lease: int) -> int:
        self._touch()
        if lease not in self._leases:
            raise LeaseNotFound(lease)
        self._end_lease(lease)
        return self._revision

    async def expire(self) -> int:
        self._touch()
        return self._revision

    def watch(self, prefix: str, after_rev: int) -> AsyncIterator[Event]:
        return self._watch(prefix, after_rev)

    async def close(self) -> None:
        self._closed = True
        for watcher in self._watchers.values():
            watcher.wake.set()

    # -- state machine ------------------------------------------------------------------

    def _touch(self) -> None:
        if self._closed:
            raise StoreClosed()
        now = self._clock()
        due = sorted(
            (held.deadline, lease) for lease, held in self._leases.items() if held.deadline <= now
        )
        for _, lease in due:
            self._end_lease(lease)

    def _compare(self, key: str, if_mod_rev: int | None) -> None:
        if if_mod_rev is None:
            return
        current = self._kv.get(key)
        actual = current.mod_revision if current is not None else 0
        if actual != if_mod_rev:
            raise Conflict(key, if_mod_rev, actual)

    def _end_lease(self, lease: int) -> None:
        keys = sorted(self._leases[lease].keys)
        revision = self._revision + 1 if keys else self._revision
        # All of a lease's keys go in one revision, as etcd's revoke does.
        events = tuple(Event(EventKind.DELETE, key, b"", revision) for key in keys)
        self._apply(revision, events=events, deleted=tuple(keys), revoked=(lease,))

    def _apply(
        self,
        revision: int,
        *,
        events: tuple[Event, ...] = (),
        items: tuple[Item, ...] = (),
        deleted: tuple[str, ...] = (),
        granted: tuple[tuple[int, int], ...] = (),
        revoked: tuple[int, ...] = (),
        next_lease: int | None = None,
    ) -> None:
        compacted = max(self._compacted, revision - self._history_limit)
        change = JournalEntry(
            revision=revision,
            events=events,
            items=items,
            deleted=deleted,
            granted=granted,
            revoked=revoked,
            compacted=compacted,
            next_lease=self._next_lease if next_lease is None else next_lease,
        )
        if self._journal is not None:
            self._journal.record(change)  # first: a failed record changes nothing
        self._revision = revision
        self._compacted = compacted
        self._next_lease = change.next_lease
        now = self._clock()
        for lease, ttl in granted:
            self._leases[lease] = _Lease(ttl, now + ttl)
        for item in items:
            self._detach(item.key)
            self._kv[item.key] = item
            if item.lease is not None:
                self._leases[item.lease].keys.add(item.key)
        for key in deleted:
            self._detach(key)
            del self._kv[key]
        for lease in revoked:
            del self._leases[lease]
        self._history.extend(events)
        while self._history and self._history[0].mod_revision <= compacted:
            self._history.popleft()
        if events:
            changed = [event.key for event in events]
            for watcher in self._watchers.values():
                if any(key.startswith(watcher.prefix) for key in changed):
                    watcher.wake.set()
                elif watcher.idle and not watcher.wake.is_set():
                    # Nothing of its own since its cursor: a quiet prefix keeps up with the
                    # store's revision, so compaction never cuts it off (etcd moves idle
                    # watchers forward the same way).
                    watcher.cursor = self._revision

    def _detach(self, key: str) -> None:
        old = self._kv.get(key)
        if old is not None and old.lease is not None and old.lease in self._leases:
            self._leases[old.lease].keys.discard(key)

    def _events_after(self, prefix: str, after_rev: int) -> list[Event]:
        if after_rev < self._compacted:
            raise Compacted(self._compacted, after_rev)
        return [e for e in self._history if e.mod_revision > after_rev and e.key.startswith(prefix)]

    async def _watch(self, prefix: str, after_rev: int) -> AsyncIterator[Event]:
        watcher = _Watcher(prefix, after_rev)
        token = id(watcher)
        self._watchers[token] = watcher
        wake = watcher.wake
        try:
            while True:
                if self._closed:
                    raise StoreClosed()
                # Clear before reading: a write between the read and the wait sets it again,
                # so no wake-up is lost.
                wake.clear()
                events = self._events_after(prefix, watcher.cursor)
                for event in events:
                    yield event
                    watcher.cursor = event.mod_revision
                if not events:
                    watcher.idle = True
                    try:
                        await wake.wait()
                    finally:
                        watcher.idle = False
                    self.wakeups += 1
        finally:
            del self._watchers[token]


class _Watcher:
    """One watch's state the writers see: its prefix, its wake-up, how far it has read, and
    whether it is waiting (only then may a write elsewhere move its cursor)."""

    __slots__ = ("cursor", "idle", "prefix", "wake")

    def __init__(self, prefix: str, cursor: int) -> None:
        self.prefix = prefix
        self.cursor = cursor
        self.idle = False
        self.wake = asyncio.Event()
