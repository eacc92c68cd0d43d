"""What the in-process store (and the SQLite store built on it) promises beyond the contract: a
change wakes only the watchers of its prefix, and a change its journal refuses is not applied."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from pathlib import Path

import pytest

from meshlib.control import MemoryStore, SQLiteStore
from meshlib.control.memory import JournalEntry

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(10)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_change_wakes_only_the_watchers_of_its_prefix(kind: str, tmp_path: Path) -> None:
    store = MemoryStore() if kind == "memory" else SQLiteStore(tmp_path)
    try:
        prefixes = [f"svc/{n}/" for n in range(10)]
        watches = [store.watch(prefix, 0) for prefix in prefixes]
        firsts = [asyncio.ensure_future(w.__anext__()) for w in watches]
        for _ in range(5):
            await asyncio.sleep(0)  # every watcher reaches its wait
        assert store.wakeups == 0

        await store.put("svc/3/i1", b"x")
        assert (await firsts[3]).key == "svc/3/i1"
        for _ in range(5):
            await asyncio.sleep(0)
        assert store.wakeups == 1
        assert [f.done() for f in firsts] == [n == 3 for n in range(10)]
        for first in firsts:
            first.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for watch in watches:
            async with aclosing(watch):
                pass
    finally:
        await store.close()


class FailingJournal:
    """A journal whose disk is full from the n-th record on."""

    def __init__(self, fail_from: int) -> None:
        self.recorded: list[JournalEntry] = []
        self.fail_from = fail_from

    def record(self, change: JournalEntry) -> None:
        if len(self.recorded) >= self.fail_from:
            raise OSError("disk full")
        self.recorded.append(change)


async def test_a_change_the_journal_refuses_is_not_applied() -> None:
    journal = FailingJournal(fail_from=2)
    store = MemoryStore(journal=journal)
    lease = await store.grant(10)
    await store.put("k", b"v1", lease=lease)
    async with aclosing(store.watch("", 0)) as events:
        assert (await events.__anext__()).value == b"v1"
        with pytest.raises(OSError, match="disk full"):
            await store.put("k", b"v2")
        with pytest.raises(OSError):
            await store.revoke(lease)
        revision, items = await store.range("")
        assert revision == 1
        assert [(i.value, i.lease) for i in items] == [(b"v1", lease)]
        pending = asyncio.ensure_future(events.__anext__())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not pending.done()  # no event for a write that did not happen
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
    assert [c.revision for c in journal.recorded] == [0, 1]
