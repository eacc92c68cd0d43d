"""The one contract every registry store keeps (meshlib/control/store.py), run against each
store in :data:`STORES`.

The tests speak only the ``Store`` protocol plus a :class:`Rig`: a store factory and a way to
move the store's time. The etcd store runs each store on its own fresh one-member etcd (started
in the store's data dir, stopped at teardown); it enforces the leases it grants on the injected
clock too, so the same fake clock drives it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, aclosing
from dataclasses import dataclass
from pathlib import Path

import pytest
from etcd_cluster import EtcdCluster, needs_etcd
from policy.fakes import FakeClock

from meshlib.control import (
    Compacted,
    Conflict,
    EtcdStore,
    Event,
    EventKind,
    LeaseNotFound,
    MemoryStore,
    SQLiteStore,
    Store,
    StoreClosed,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


#: Builds a store in ``data_dir`` whose leases run on ``clock``, keeping ``history`` revisions;
#: whatever it starts for the store (a server) it stops through the ``ExitStack``.
Factory = Callable[[Path, FakeClock, int, ExitStack], Store]


def etcd_store(data_dir: Path, clock: FakeClock, history: int, stack: ExitStack) -> Store:
    """An etcd store on its own fresh one-member etcd in ``data_dir`` (about 1 s to start)."""
    cluster = EtcdCluster.start(data_dir, 1)
    stack.callback(cluster.stop)
    return EtcdStore(cluster.endpoints, clock=clock, history=history)


STORES: dict[str, Factory] = {
    "memory": lambda data_dir, clock, history, _: MemoryStore(clock=clock, history=history),
    "sqlite": lambda data_dir, clock, history, _: SQLiteStore(
        data_dir, clock=clock, history=history
    ),
    "etcd": etcd_store,
}
#: Marks per store: the etcd rows skip where the binary is missing.
MARKS = {"etcd": [needs_etcd]}


@dataclass
class Rig:
    """A store under test and its clock; :meth:`make` builds another (e.g. a short history)."""

    factory: Factory
    data_dir: Path
    clock: FakeClock
    opened: list[Store]
    stack: ExitStack

    def make(self, history: int = 1000) -> Store:
        directory = self.data_dir / f"store{len(self.opened)}"
        directory.mkdir()
        store = self.factory(directory, self.clock, history, self.stack)
        self.opened.append(store)
        return store

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


@pytest.fixture(params=[pytest.param(name, marks=MARKS.get(name, [])) for name in sorted(STORES)])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    with ExitStack() as stack:
        rig = Rig(STORES[request.param], tmp_path, FakeClock(), [], stack)
        yield rig
        for store in rig.opened:
            asyncio.run(store.close())


async def take(events: AsyncIterator[Event], n: int) -> list[Event]:
    return [await events.__anext__() for _ in range(n)]


def put(key: str, value: bytes, revision: int) -> Event:
    return Event(EventKind.PUT, key, value, revision)


def deleted(key: str, revision: int) -> Event:
    return Event(EventKind.DELETE, key, b"", revision)


async def test_put_and_range_sorted_by_key_with_one_revision_per_write(rig: Rig) -> None:
    store = rig.make()
    assert await store.range("") == (0, [])
    assert await store.put("svc/b", b"2") == 1
    assert await store.put("svc/a", b"1") == 2
    assert await store.put("policy/v1", b"p") == 3
    assert await store.put("svc/a", b"1bis") == 4

    revision, items = await store.range("svc/")
    assert revision == 4
    assert [(i.key, i.value, i.mod_revision, i.lease) for i in items] == [
        ("svc/a", b"1bis", 4, None),
        ("svc/b", b"2", 1, None),
    ]
    revision, items = await store.range("")
    assert [i.key for i in items] == ["policy/v1", "svc/a", "svc/b"]
    assert (await store.range("nothing/"))[1] == []


async def test_compare_and_set_creates_updates_and_refuses_a_stale_revision(rig: Rig) -> None:
    store = rig.make()
    created = await store.put("k", b"v1", if_mod_rev=0)
    with pytest.raises(Conflict) as info:
        await store.put("k", b"again", if_mod_rev=0)
    assert (info.value.key, info.value.expected, info.value.actual) == ("k", 0, created)
    assert "'k'" in str(info.value) and str(created) in str(info.value)

    updated = await store.put("k", b"v2", if_mod_rev=created)
    with pytest.raises(Conflict) as info:
        await store.put("k", b"stale", if_mod_rev=created)
    assert (info.value.expected, info.value.actual) == (created, updated)
    with pytest.raises(Conflict):
        await store.put("absent", b"x", if_mod_rev=updated)

    # A refused write changes nothing, not even the revision.
    revision, items = await store.range("")
    assert revision == updated
    assert [(i.key, i.value) for i in items] == [("k", b"v2")]


async def test_put_all_writes_every_key_in_one_revision_or_none(rig: Rig) -> None:
    store = rig.make()
    index = await store.put("idx/a", b"1")
    async with aclosing(store.watch("", index)) as events:
        both = await store.put_all([("idx/a", b"2", index), ("rec/a/1", b"r1", None)])
        assert both == index + 1
        assert await take(events, 2) == [put("idx/a", b"2", both), put("rec/a/1", b"r1", both)]

        # One stale compare (the second key's) and nothing is written, not even the first key.
        with pytest.raises(Conflict) as info:
            await store.put_all(
                [("idx/a", b"3", both), ("rec/a/2", b"r2", 0), ("rec/a/1", b"x", 1)]
            )
        assert (info.value.key, info.value.expected, info.value.actual) == ("rec/a/1", 1, both)
        revision, items = await store.range("")
        assert revision == both
        assert [(i.key, i.value, i.mod_revision) for i in items] == [
            ("idx/a", b"2", both),
            ("rec/a/1", b"r1", both),
        ]

        third = await store.put_all([("idx/a", b"3", both), ("rec/a/2", b"r2", 0)])
        assert await take(events, 2) == [put("idx/a", b"3", third), put("rec/a/2", b"r2", third)]
    with pytest.raises(ValueError, match="each key once"):
        await store.put_all([("k", b"1", None), ("k", b"2", None)])
    with pytest.raises(ValueError, match="at least one"):
        await store.put_all([])


@pytest.mark.parametrize("start", ["absent", "present"])
async def test_concurrent_compare_and_set_exactly_one_wins(rig: Rig, start: str) -> None:
    """DATA-4 at the store: two writers with the same fencing token, as concurrent tasks."""
    store = rig.make()
    token = 0 if start == "absent" else await store.put("policy", b"v0")

    async def write(value: bytes) -> int:
        await asyncio.sleep(0)  # both tasks start before either writes
        return await store.put("policy", value, if_mod_rev=token)

    results = await asyncio.gather(write(b"A"), write(b"B"), return_exceptions=True)
    wins = [r for r in results if isinstance(r, int)]
    losses = [r for r in results if isinstance(r, Conflict)]
    assert len(wins) == 1 and len(losses) == 1, results
    winner = b"A" if isinstance(results[0], int) else b"B"
    revision, items = await store.range("policy")
    assert revision == wins[0]
    assert [(i.value, i.mod_revision) for i in items] == [(winner, wins[0])]
    assert losses[0].actual == wins[0]


async def test_delete_takes_a_revision_only_when_it_removes_something(rig: Rig) -> None:
    store = rig.make()
    first = await store.put("a", b"1")
    await store.put("b", b"2")
    with pytest.raises(Conflict):
        await store.delete("a", if_mod_rev=first + 1)
    assert [i.key for i in (await store.range(""))[1]] == ["a", "b"]

    removed = await store.delete("a", if_mod_rev=first)
    assert removed == 3
    assert await store.delete("a") == 3  # absent: nothing changes
    revision, items = await store.range("")
    assert revision == 3 and [i.key for i in items] == ["b"]


async def test_lease_keeps_its_keys_while_kept_alive_and_expires_with_the_clock(rig: Rig) -> None:
    store = rig.make()
    lease = await store.grant(10)
    await store.put("inst/1", b"x", lease=lease)
    rig.advance(9)
    await store.keepalive(lease)
    rig.advance(9)  # 18 s after the grant, 9 s after the keepalive
    (_, items) = await store.range("inst/")
    assert [(i.key, i.lease) for i in items] == [("inst/1", lease)]

    rig.advance(1.5)
    assert (await store.range("inst/"))[1] == []
    with pytest.raises(LeaseNotFound) as info:
        await store.keepalive(lease)
    assert info.value.lease == lease and str(lease) in str(info.value)
    with pytest.raises(LeaseNotFound):
        await store.put("inst/2", b"y", lease=lease)
    with pytest.raises(LeaseNotFound):
        await store.revoke(lease)
    with pytest.raises(LeaseNotFound):
        await store.keepalive(12345)


async def test_a_put_without_lease_detaches_the_key_from_its_lease(rig: Rig) -> None:
    store = rig.make()
    lease = await store.grant(5)
    await store.put("k", b"leased", lease=lease)
    await store.put("k", b"kept")
    await store.revoke(lease)
    assert [(i.value, i.lease) for i in (await store.range("k"))[1]] == [(b"kept", None)]


async def test_revoke_deletes_the_lease_keys_in_one_revision_with_watch_events(rig: Rig) -> None:
    store = rig.make()
    lease = await store.grant(30)
    await store.put("i/a", b"1", lease=lease)
    await store.put("i/b", b"2", lease=lease)
    watched_from = await store.put("i/c", b"3")
    async with aclosing(store.watch("i/", watched_from)) as events:
        revision = await store.revoke(lease)
        assert revision == watched_from + 1
        assert await take(events, 2) == [deleted("i/a", revision), deleted("i/b", revision)]
    assert [i.key for i in (await store.range("i/"))[1]] == ["i/c"]


async def test_expiry_reaches_watchers_through_expire(rig: Rig) -> None:
    store = rig.make()
    lease = await store.grant(3)
    at = await store.put("i/a", b"1", lease=lease)
    async with aclosing(store.watch("i/", at)) as events:
        rig.advance(3)
        assert await store.expire() == at + 1
        assert await take(events, 1) == [deleted("i/a", at + 1)]


async def test_watch_replays_after_a_revision_then_follows_without_gaps(rig: Rig) -> None:
    store = rig.make()
    for n in range(1, 6):
        await store.put(f"k/{n}", str(n).encode())
    async with aclosing(store.watch("k/", 2)) as events:
        assert await take(events, 3) == [put(f"k/{n}", str(n).encode(), n) for n in (3, 4, 5)]

        pending = asyncio.ensure_future(take(events, 4))
        await store.put("k/6", b"6")
        await store.delete("k/1")
        await store.put("k/3", b"three")
        await store.put("k/7", b"7")
        assert await pending == [
            put("k/6", b"6", 6),
            deleted("k/1", 7),
            put("k/3", b"three", 8),
            put("k/7", b"7", 9),
        ]


async def test_a_watcher_is_not_woken_by_another_prefix(rig: Rig) -> None:
    store = rig.make()
    async with aclosing(store.watch("a/", 0)) as events:
        first = asyncio.ensure_future(events.__anext__())
        await store.put("b/1", b"other")
        await store.put("ab", b"not under a/")
        for _ in range(20):  # let the watcher run, were it woken
            await asyncio.sleep(0)
        assert not first.done()
        await store.put("a/1", b"mine")
        assert await first == put("a/1", b"mine", 3)


async def test_compacted_history_raises_and_relisting_resumes(rig: Rig) -> None:
    store = rig.make(history=3)
    for n in range(1, 11):
        await store.put(f"k/{n % 4}", str(n).encode())
    with pytest.raises(Compacted) as info:
        async with aclosing(store.watch("k/", 2)) as events:
            await events.__anext__()
    assert info.value.revision == 7
    assert "revision 2" in str(info.value)

    # Re-list, then watch from the listed revision: nothing missed, nothing repeated.
    revision, items = await store.range("k/")
    assert revision == 10
    assert {i.key: i.value for i in items} == {"k/0": b"8", "k/1": b"9", "k/2": b"10", "k/3": b"7"}
    async with aclosing(store.watch("k/", revision)) as events:
        await store.put("k/5", b"11")
        assert await take(events, 1) == [put("k/5", b"11", 11)]
    # The oldest revision a watch can still resume after is the one Compacted named.
    async with aclosing(store.watch("k/", 8)) as events:
        assert [e.mod_revision for e in await take(events, 3)] == [9, 10, 11]


async def test_a_watcher_falling_behind_the_history_gets_compacted(rig: Rig) -> None:
    store = rig.make(history=2)
    await store.put("k/x", b"1")
    async with aclosing(store.watch("k/", 0)) as events:
        assert await take(events, 1) == [put("k/x", b"1", 1)]
        for n in range(2, 6):
            await store.put("k/x", str(n).encode())
        with pytest.raises(Compacted) as info:
            await take(events, 1)
        assert info.value.revision == 3


async def test_a_quiet_watcher_is_not_cut_off_by_compaction_elsewhere(rig: Rig) -> None:
    """A watcher caught up on a quiet prefix while other prefixes write past the history has
    missed nothing: its next event arrives, not Compacted (etcd moves idle watchers along)."""
    store = rig.make(history=2)
    async with aclosing(store.watch("quiet/", 0)) as events:
        first = asyncio.ensure_future(events.__anext__())
        for _ in range(20):  # let the watcher reach its wait
            await asyncio.sleep(0)
        for n in range(20):
            await store.put("busy/x", str(n).encode())
        await store.put("quiet/a", b"mine")
        assert await first == put("quiet/a", b"mine", 21)


async def test_close_ends_watches_and_refuses_operations(rig: Rig) -> None:
    store = rig.make()
    async with aclosing(store.watch("", 0)) as events:
        pending = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0)
        await store.close()
        with pytest.raises(StoreClosed):
            await pending
    with pytest.raises(StoreClosed):
        await store.range("")
