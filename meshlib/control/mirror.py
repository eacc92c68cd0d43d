"""A registry replica's view of a shared store: the store's key layout and records, the mapping of
store events onto the pure core (with a per-key guard against stale events), and the debouncer of
watcher wake-ups — pure, the time passed in as ``now``.

Several registry processes over one store (etcd) each keep the whole registry in memory: they
list ``/registry/`` once, then apply every watch event to their :class:`Registry`, so a watcher
held on replica B hears of a registration made through replica A (docs/control-plane.md,
"Replicas"). The driver (``meshlib.control.app``) does the I/O; this module decides.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from meshlib.control.registry import Instance, PolicyVersion, Registry, ServiceKey
from meshlib.control.store import Event, EventKind, Item

__all__ = [
    "EPOCH_KEY",
    "INDEXES",
    "INSTANCES",
    "POLICY",
    "PREFIX",
    "Debouncer",
    "Mirror",
    "index_key",
    "instance_from_record",
    "instance_key",
]

PREFIX = "/registry/"
EPOCH_KEY = "/registry/epoch"
INSTANCES = "/registry/instances/"
INDEXES = "/registry/indexes/"
POLICY = "/registry/policy/"


def index_key(key: ServiceKey) -> str:
    """The store key of a service's index."""
    return f"{INDEXES}{key[0]}/{key[1]}"


def instance_key(instance: Instance) -> str:
    """The store key of an instance's record."""
    return f"{INSTANCES}{instance.namespace}/{instance.service}/{instance.id}"


def instance_from_record(record: dict[str, Any], now: float, wall_now: float) -> Instance:
    """A stored instance with its wall-clock times mapped onto the monotonic clock's ``now``."""
    return Instance(
        record["id"],
        record["namespace"],
        record["service"],
        record["address"],
        record["port"],
        tuple(sorted(record["labels"].items())),
        record["metrics_port"],
        record["identity"],
        float(record["ttl"]),
        registered_at=now - max(0.0, wall_now - record["registered_wall"]),
        last_heartbeat=now - max(0.0, wall_now - record["heartbeat_wall"]),
        applied_version=record["applied_version"],
        rejected_version=record["rejected_version"],
        rejection=record["rejection"],
    )


#: What a mirrored change touched, for the wake-ups: a service, or None for the policy.
Touched = ServiceKey | None


@dataclass
class _Applied:
    revision: int
    present: bool


class Mirror:
    """The events a replica applied to its ``registry``, per key.

    Each key's last applied ``mod_revision`` is kept (deletes too, as tombstones): an event
    older than it is ignored, so the echo of this replica's own write — committed to the core at
    once — changes nothing, and neither does a late event after a newer list. ``revision`` is
    the store revision the mirror has caught up to (a writer that lost a compare-and-set waits
    for it to pass the winner's revision, then plans again).
    """

    def __init__(self, registry: Registry, revision: int = 0) -> None:
        self.registry = registry
        self.revision = revision
        self._applied: dict[str, _Applied] = {}
        # This replica's own deletes, (revision, key): a tombstone is needed only until the
        # watch has passed its revision (events come in order), then it is dropped, so deleted
        # keys do not pile up in a long-lived replica.
        self._tombstones: list[tuple[int, str]] = []
        # A writer moves a service's index, then writes the one record the move counts (a
        # drain's or an expiry's delete; a register's put comes in the same revision, right
        # after the index). The index waits here until that record arrives, so a watcher woken
        # by it never answers without the change: service -> (index, when it arrived).
        self._pending: dict[ServiceKey, tuple[int, float]] = {}
        # Keys this replica is writing: their events wait until the write's revision is known
        # (the echo of a write may arrive before the write's own answer).
        self._inflight: dict[str, list[Event]] = {}

    def writing(self, key: str) -> None:
        """This replica starts a write of ``key``: hold its events until :meth:`written`."""
        self._inflight.setdefault(key, [])

    def written(self, key: str, revision: int | None, *, present: bool = True) -> list[Event]:
        """The write of ``key`` ended: at ``revision`` (None: it failed, nothing known). Returns
        the held events for the driver to :meth:`apply` (the write's own echo is then stale)."""
        held = self._inflight.pop(key, [])
        if revision is not None:
            self.wrote(key, revision, present=present)
        return held

    def pending(self, key: ServiceKey) -> bool:
        """Whether an index of ``key`` waits for its record."""
        return key in self._pending

    def settle(self, key: ServiceKey) -> set[Touched]:
        """Apply ``key``'s waiting index now (before this replica plans a change of its own to
        the service, or once the record is overdue: its writer died between the two writes)."""
        waiting = self._pending.pop(key, None)
        if waiting is None or not self.registry.set_index(key, waiting[0]):
            return set()
        return {key}

    def flush(self, now: float, older_than: float) -> set[Touched]:
        """Settle every index that has waited ``older_than`` seconds or more for its record."""
        touched: set[Touched] = set()
        for key, (_, since) in sorted(self._pending.items()):
            if now - since >= older_than:
                touched |= self.settle(key)
        return touched

    def mod_revision(self, key: str) -> int:
        """The key's mod_revision as far as the mirror knows: 0 when absent (a compare-and-set
        that creates it)."""
        seen = self._applied.get(key)
        return seen.revision if seen is not None and seen.present else 0

    def wrote(self, key: str, revision: int, *, present: bool = True) -> None:
        """Record this replica's own write (already committed to the core)."""
        seen = self._applied.get(key)
        if seen is None or seen.revision <= revision:
            self._applied[key] = _Applied(revision, present)
            if not present:
                heapq.heappush(self._tombstones, (revision, key))

    def tracked(self) -> int:
        """How many keys the mirror keeps a revision for (live keys and unpassed tombstones)."""
        return len(self._applied)

    def apply(self, event: Event, now: float, wall_now: float) -> set[Touched]:
        """Apply one store event; what it changed for watchers (empty: nothing, or stale)."""
        self.revision = max(self.revision, event.mod_revision)
        held = self._inflight.get(event.key)
        if held is not None:
            held.append(event)
            return set()
        seen = self._applied.get(event.key)
        if seen is not None and event.mod_revision <= seen.revision:
            self._prune()
            return set()
        present = event.kind is EventKind.PUT
        if present:
            self._applied[event.key] = _Applied(event.mod_revision, present)
        else:  # the watch is in order: no older event of the key can follow
            self._applied.pop(event.key, None)
        self._prune()
        return self._take(event.key, event.value if present else None, now, wall_now)

    def _prune(self) -> None:
        while self._tombstones and self._tombstones[0][0] <= self.revision:
            revision, key = heapq.heappop(self._tombstones)
            seen = self._applied.get(key)
            if seen is not None and not seen.present and seen.revision == revision:
                del self._applied[key]

    def relist(
        self, revision: int, items: Iterable[Item], now: float, wall_now: float
    ) -> set[Touched]:
        """Apply a full list taken at ``revision`` (after a compaction): every listed key as a
        put, and every instance the list no longer has — unless this replica wrote it after
        ``revision`` — as a delete."""
        touched: set[Touched] = set()
        listed: set[str] = set()
        for item in items:
            listed.add(item.key)
            put = Event(EventKind.PUT, item.key, item.value, item.mod_revision)
            touched |= self.apply(put, now, wall_now)
        for instance in self.registry.instances():
            key = instance_key(instance)
            if key not in listed and self._applied.get(key, _Applied(0, True)).revision <= revision:
                self._applied.pop(key, None)
                touched |= self._take(key, None, now, wall_now)
        self.revision = max(self.revision, revision)
        self._prune()
        for service in list(self._pending):  # a list is whole: nothing is still to come
            touched |= self.settle(service)
        return touched

    def _take(self, key: str, value: bytes | None, now: float, wall_now: float) -> set[Touched]:
        registry = self.registry
        if key.startswith(INSTANCES):
            if value is None:
                gone = registry.remove(key.rsplit("/", 1)[-1])
                if gone is None:
                    return set()
                return {gone.key, *self.settle(gone.key)}
            instance = instance_from_record(json.loads(value), now, wall_now)
            if not registry.upsert(instance):
                return set()  # a beat: watchers see nothing, and no index counts it
            return {instance.key, *self.settle(instance.key)}
        if key.startswith(INDEXES) and value is not None:
            service: ServiceKey = tuple(key[len(INDEXES) :].split("/", 1))  # type: ignore[assignment]
            touched = self.settle(service)  # its record never came: announce it anyway
            if int(value) > registry.index(*service):
                self._pending[service] = (int(value), now)
            return touched
        if key.startswith(POLICY) and value is not None:
            version = PolicyVersion(**json.loads(value))
            # versions are written in order, each with if_mod_rev=0 after the one before it
            return {None} if registry.policy.add(version) else set()
        return set()  # the epoch, tokens: not the core's


class Debouncer:
    """Wake-ups held until ``quiet`` seconds pass without another change to the same key, or
    ``most`` seconds after its first pending change, whichever comes first (a 50-instance
    rollout wakes a service's watchers once, not 50 times)."""

    def __init__(self, quiet: float, most: float) -> None:
        for name, value in (("quiet", quiet), ("most", most)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"debounce {name} must be >= 0 seconds, got {value!r}")
        if most < quiet:
            raise ValueError(f"debounce most ({most!r} s) must be >= quiet ({quiet!r} s)")
        self.quiet = quiet
        self.most = most
        # key -> (first pending change, last change)
        self._pending: dict[Hashable, tuple[float, float]] = {}

    def change(self, key: Hashable, now: float) -> None:
        first, _ = self._pending.get(key, (now, now))
        self._pending[key] = (first, now)

    def _deadline(self, first: float, last: float) -> float:
        return min(last + self.quiet, first + self.most)

    def due(self, now: float) -> list[Hashable]:
        """The keys to wake now (each leaves the pending set)."""
        ready = [k for k, (f, last) in self._pending.items() if now >= self._deadline(f, last)]
        for key in ready:
            del self._pending[key]
        return ready

    def next_deadline(self) -> float | None:
        """When the earliest pending key is due (None: nothing pending)."""
        if not self._pending:
            return None
        return min(self._deadline(f, last) for f, last in self._pending.values())
