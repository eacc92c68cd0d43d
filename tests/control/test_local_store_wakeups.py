"""The in-process stores wake a waiting watcher only for a change under its prefix (the
contract suite checks what a watcher receives; this checks that nothing else wakes it)."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from pathlib import Path

import pytest

from meshlib.control import MemoryStore, SQLiteStore

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
