"""A replica's mirror of the shared store, pure (fake clock, no sockets): the core taking records
from the store (upsert, remove, an index that never goes back, the next policy version), the
event → core mapping with its per-key stale-event guard, and the wake-up debouncer."""

from __future__ import annotations

import json

import pytest
from policy.fakes import FakeClock

from meshlib.control.mirror import (
    EPOCH_KEY,
    INSTANCES,
    POLICY,
    Debouncer,
    Mirror,
    index_key,
)
from meshlib.control.registry import (
    Instance,
    PolicyVersion,
    Registry,
    RegistrySettings,
    instance_id,
    policy_digest,
)
from meshlib.control.store import Event, EventKind, Item

NS, SVC = "default", "reviews"
WORKLOAD = "spiffe://cluster.local/ns/default/sa/reviews"
WALL = 1_700_000_000.0


def instance(
    port: int, beat: float, *, ttl: float = 10.0, labels: dict[str, str] | None = None
) -> Instance:
    return Instance(
        instance_id(NS, SVC, "10.0.0.1", port),
        NS,
        SVC,
        "10.0.0.1",
        port,
        tuple(sorted((labels or {}).items())),
        None,
        WORKLOAD,
        ttl,
        registered_at=beat,
        last_heartbeat=beat,
    )


def record(port: int, beat_wall: float, **labels: str) -> bytes:
    return json.dumps(
        {
            "id": instance_id(NS, SVC, "10.0.0.1", port),
            "namespace": NS,
            "service": SVC,
            "address": "10.0.0.1",
            "port": port,
            "labels": labels,
            "metrics_port": None,
            "identity": WORKLOAD,
            "ttl": 10.0,
            "registered_wall": beat_wall,
            "heartbeat_wall": beat_wall,
            "applied_version": None,
            "rejected_version": None,
            "rejection": None,
        }
    ).encode()


def ikey(port: int) -> str:
    return f"{INSTANCES}{NS}/{SVC}/{instance_id(NS, SVC, '10.0.0.1', port)}"


def version(n: int) -> PolicyVersion:
    text = f"# version {n}\n"
    return PolicyVersion(n, text, policy_digest(text), "admin", 1.0)


# -- the core taking records ---------------------------------------------------------------------


def test_upsert_adds_and_reports_only_what_a_watcher_sees() -> None:
    registry = Registry("e", 100.0)
    assert registry.upsert(instance(1, 100.0)) is True  # new
    assert registry.upsert(instance(1, 103.0)) is False  # a beat: watchers see nothing
    assert registry.get(instance(1, 0).id).last_heartbeat == 103.0  # type: ignore[union-attr]
    assert registry.upsert(instance(1, 104.0, labels={"v": "2"})) is True  # re-registered
    assert registry.index(NS, SVC) == 1  # the writer moves the index, not the mirror


def test_upsert_keeps_the_later_beat() -> None:
    registry = Registry("e", 100.0)
    registry.upsert(instance(1, 100.0))
    assert registry.heartbeat(instance(1, 0).id, 109.0)  # a local beat not yet persisted
    registry.upsert(instance(1, 102.0))  # an older record from another replica
    assert registry.get(instance(1, 0).id).last_heartbeat == 109.0  # type: ignore[union-attr]


def test_remove_and_set_index_never_backwards() -> None:
    registry = Registry("e", 100.0)
    registry.upsert(instance(1, 100.0))
    assert registry.remove(instance(1, 0).id) is not None
    assert registry.remove(instance(1, 0).id) is None
    assert registry.endpoints(NS, SVC, 100.0).instances == ()
    assert registry.set_index((NS, SVC), 5) is True
    assert registry.set_index((NS, SVC), 3) is False
    assert registry.index(NS, SVC) == 5


def test_commit_never_moves_an_index_backwards() -> None:
    registry = Registry("e", 100.0)
    done = registry.plan_register(NS, SVC, "10.0.0.1", 1, identity=WORKLOAD, now=100.0)
    assert done.index == 2
    registry.set_index((NS, SVC), 7)  # another replica's index arrived meanwhile
    registry.commit(done)
    assert registry.index(NS, SVC) == 7


def test_policy_add_takes_the_next_version_once() -> None:
    registry = Registry("e", 100.0)
    assert registry.policy.add(version(1)) is True
    assert registry.policy.add(version(1)) is False
    with pytest.raises(ValueError, match="not the next one"):
        registry.policy.add(version(3))
    assert registry.policy.version == 1


# -- events onto the core ------------------------------------------------------------------------


def test_events_map_onto_the_core_and_stale_ones_are_ignored() -> None:
    clock = FakeClock(500.0)
    registry = Registry("e", clock(), RegistrySettings(warming=0.0))
    mirror = Mirror(registry)
    put = Event(EventKind.PUT, index_key((NS, SVC)), b"2", 3)
    # the index waits for the record it counts: a woken watcher must see the change
    assert mirror.apply(put, clock(), WALL) == set()
    assert mirror.pending((NS, SVC)) and registry.index(NS, SVC) == 1
    assert mirror.apply(Event(EventKind.PUT, ikey(1), record(1, WALL - 2), 4), clock(), WALL) == {
        (NS, SVC)
    }
    assert not mirror.pending((NS, SVC)) and registry.index(NS, SVC) == 2
    got = registry.get(instance(1, 0).id)
    assert got is not None and got.last_heartbeat == clock() - 2  # wall mapped onto the clock
    # a stale event for a key (older than what is applied) changes nothing
    assert mirror.apply(Event(EventKind.DELETE, ikey(1), b"", 4), clock(), WALL) == set()
    assert registry.get(instance(1, 0).id) is not None
    # this replica's own write, then its echo: a no-op
    mirror.wrote(ikey(1), 9, present=False)
    registry.remove(instance(1, 0).id)
    assert mirror.apply(Event(EventKind.PUT, ikey(1), record(1, WALL), 9), clock(), WALL) == set()
    assert registry.get(instance(1, 0).id) is None
    assert mirror.mod_revision(ikey(1)) == 0  # absent
    assert mirror.mod_revision(index_key((NS, SVC))) == 3
    # a newer delete removes; the epoch is not the core's
    mirror.apply(Event(EventKind.PUT, ikey(2), record(2, WALL), 10), clock(), WALL)
    assert mirror.apply(Event(EventKind.DELETE, ikey(2), b"", 11), clock(), WALL) == {(NS, SVC)}
    assert mirror.apply(Event(EventKind.PUT, EPOCH_KEY, b"x", 12), clock(), WALL) == set()
    assert mirror.revision == 12


def test_an_index_whose_record_never_comes_is_announced_anyway() -> None:
    registry = Registry("e", 100.0)
    mirror = Mirror(registry)
    service = (NS, SVC)
    mirror.apply(Event(EventKind.PUT, ikey(1), record(1, WALL), 2), 100.0, WALL)
    mirror.apply(Event(EventKind.PUT, index_key(service), b"2", 3), 100.0, WALL)
    # a beat (no change a watcher sees) is not the record the index counts
    assert mirror.apply(Event(EventKind.PUT, ikey(1), record(1, WALL + 1), 4), 100.0, WALL) == set()
    assert mirror.pending(service) and registry.index(NS, SVC) == 1
    # its writer died: the next index settles it, and the tick's flush settles that one
    assert mirror.apply(Event(EventKind.PUT, index_key(service), b"3", 6), 101.0, WALL) == {service}
    assert registry.index(NS, SVC) == 2
    mirror.apply(Event(EventKind.PUT, index_key(service), b"4", 7), 101.0, WALL)
    assert registry.index(NS, SVC) == 3
    assert mirror.flush(102.0, 2.0) == set()
    assert mirror.flush(103.0, 2.0) == {service}
    assert registry.index(NS, SVC) == 4 and not mirror.pending(service)
    # a plan of this replica's own settles it at once
    mirror.apply(Event(EventKind.PUT, index_key(service), b"5", 8), 103.0, WALL)
    assert mirror.settle(service) == {service} and registry.index(NS, SVC) == 5


def test_policy_events_wake_the_policy_watchers() -> None:
    registry = Registry("e", 100.0)
    mirror = Mirror(registry)
    body = json.dumps(version(1).__dict__).encode()
    assert mirror.apply(Event(EventKind.PUT, f"{POLICY}{1:010d}", body, 5), 100.0, WALL) == {None}
    assert registry.policy.version == 1


def test_relist_removes_what_the_store_no_longer_has_unless_written_since() -> None:
    registry = Registry("e", 100.0)
    mirror = Mirror(registry)
    for port, rev in ((1, 2), (2, 3), (3, 4)):
        mirror.apply(Event(EventKind.PUT, ikey(port), record(port, WALL), rev), 100.0, WALL)
    mirror.wrote(ikey(3), 20)  # written by this replica after the list's revision
    touched = mirror.relist(10, [Item(ikey(1), record(1, WALL), 2)], 100.0, WALL)
    assert touched == {(NS, SVC)}
    assert {i.port for i in registry.instances()} == {1, 3}
    assert mirror.revision == 10


# -- the debouncer -------------------------------------------------------------------------------


def test_debounce_wakes_after_quiet() -> None:
    d = Debouncer(0.125, 1.0)  # binary fractions: the arithmetic is exact
    d.change("a", 0.0)
    d.change("a", 0.0625)
    assert d.due(0.125) == []  # 0.0625 s quiet only
    assert d.next_deadline() == 0.1875
    assert d.due(0.1875) == ["a"]
    assert d.due(10.0) == [] and d.next_deadline() is None


def test_debounce_wakes_at_most_after_most_under_steady_changes() -> None:
    d = Debouncer(0.1, 1.0)
    woken = []
    t = 0.0
    while t < 3.2:  # a change every 50 ms never leaves 100 ms quiet
        d.change("a", t)
        woken += [t for _ in d.due(t)]
        t = round(t + 0.05, 3)
    # once a second (the next window opens with the change after a wake-up), not 64 times
    assert woken == pytest.approx([1.0, 2.05, 3.1])


def test_debounce_keys_are_independent_and_bad_windows_refused() -> None:
    d = Debouncer(0.1, 1.0)
    d.change("a", 0.0)
    d.change("b", 0.08)
    assert d.due(0.1) == ["a"]
    assert d.due(0.18) == ["b"]
    with pytest.raises(ValueError, match="most"):
        Debouncer(1.0, 0.1)
    with pytest.raises(ValueError, match="quiet"):
        Debouncer(-1.0, 1.0)


def test_a_write_in_flight_holds_its_keys_events_until_its_revision_is_known() -> None:
    registry = Registry("e", 100.0)
    mirror = Mirror(registry)
    mirror.writing(ikey(1))
    # its echo (rev 5) and another replica's later write (rev 6) arrive before the answer
    assert mirror.apply(Event(EventKind.PUT, ikey(1), record(1, WALL), 5), 100.0, WALL) == set()
    assert mirror.apply(Event(EventKind.DELETE, ikey(1), b"", 6), 100.0, WALL) == set()
    assert registry.get(instance(1, 0).id) is None  # nothing applied yet
    registry.upsert(instance(1, 100.0))  # the driver commits its own write
    held = mirror.written(ikey(1), 5)
    assert [mirror.apply(e, 100.0, WALL) for e in held] == [set(), {(NS, SVC)}]
    assert registry.get(instance(1, 0).id) is None  # the later delete won, the echo was stale
    # a failed write (no revision): every held event applies
    mirror.writing(ikey(2))
    mirror.apply(Event(EventKind.PUT, ikey(2), record(2, WALL), 7), 100.0, WALL)
    assert [mirror.apply(e, 100.0, WALL) for e in mirror.written(ikey(2), None)] == [{(NS, SVC)}]


def test_deleted_keys_do_not_pile_up() -> None:
    registry = Registry("e", 100.0)
    mirror = Mirror(registry)
    for port in range(1, 101):  # another replica registers and drains 100 instances
        mirror.apply(Event(EventKind.PUT, ikey(port), record(port, WALL), 2 * port), 100.0, WALL)
        mirror.apply(Event(EventKind.DELETE, ikey(port), b"", 2 * port + 1), 100.0, WALL)
    assert mirror.tracked() == 0 and registry.count() == 0
    # this replica's own delete: a tombstone until the watch passes it, its echo ignored
    mirror.apply(Event(EventKind.PUT, ikey(1), record(1, WALL), 300), 100.0, WALL)
    registry.remove(instance(1, 0).id)
    mirror.wrote(ikey(1), 301, present=False)
    assert mirror.tracked() == 1
    # an event at the tombstone's revision (as its echo) is stale: no resurrection
    assert mirror.apply(Event(EventKind.PUT, ikey(1), record(1, WALL), 301), 100.0, WALL) == set()
    assert mirror.tracked() == 0 and registry.count() == 0
    # a later put of the key is newer than the tombstone was: it applies
    assert mirror.apply(Event(EventKind.PUT, ikey(1), record(1, WALL), 302), 100.0, WALL) == {
        (NS, SVC)
    }


def test_warm_again_holds_expiry_for_one_warming_period() -> None:
    registry = Registry("e", 0.0, RegistrySettings(warming=10.0))
    registry.upsert(instance(1, 0.0))  # TTL 10
    assert [i.port for i in registry.due(30.0)] == [1]
    registry.warm_again(30.0)  # the driver's store was down: the beat is stale, not the instance
    assert registry.due(39.0) == () and not registry.authoritative(39.0)
    assert [i.port for i in registry.due(40.0)] == [1] and registry.authoritative(40.0)
