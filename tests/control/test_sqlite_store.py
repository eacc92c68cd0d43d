"""What the SQLite store adds to the contract: everything survives close and reopen, and one
process owns a data dir (real subprocesses hold and contend for the lock)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import pytest
from policy.fakes import FakeClock

from meshlib.control import (
    Compacted,
    Event,
    EventKind,
    LeaseNotFound,
    SQLiteStore,
    StoreError,
    StoreLocked,
)
from meshlib.control.sqlite import DB_FILE, LOCK_FILE

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_keys_revision_leases_and_history_survive_reopen(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SQLiteStore(tmp_path, clock=clock, history=4)
    lease = await store.grant(10)
    await store.put("inst/a", b"alive", lease=lease)
    await store.put("policy", b"v1")
    await store.put("policy", b"v2")
    await store.put("gone", b"x")
    await store.delete("gone")
    last = await store.put("blob", bytes(range(256)))
    clock.advance(8)  # 2 s of the lease left when the store closes
    await store.close()
    assert (tmp_path / DB_FILE).is_file()

    # A new process's clock: a lease restarts its full TTL when the store opens.
    clock = FakeClock(start=50.0)
    store = SQLiteStore(tmp_path, clock=clock, history=4)
    try:
        revision, items = await store.range("")
        assert revision == last == 6
        assert [(i.key, i.value, i.mod_revision, i.lease) for i in items] == [
            ("blob", bytes(range(256)), 6, None),
            ("inst/a", b"alive", 1, lease),
            ("policy", b"v2", 3, None),
        ]
        # History for watches resumes where it was (the last 4 revisions are kept), and what
        # was compacted before the close stays compacted: no silent gap.
        with pytest.raises(Compacted) as info:
            async with aclosing(store.watch("", 1)) as events:
                await events.__anext__()
        assert info.value.revision == 2
        async with aclosing(store.watch("", 2)) as events:
            assert [await events.__anext__() for _ in range(4)] == [
                Event(EventKind.PUT, "policy", b"v2", 3),
                Event(EventKind.PUT, "gone", b"x", 4),
                Event(EventKind.DELETE, "gone", b"", 5),
                Event(EventKind.PUT, "blob", bytes(range(256)), 6),
            ]
        # New leases never reuse an id; revisions go on from the last one.
        assert await store.grant(5) != lease
        assert await store.put("after", b"reopen") == 7

        clock.advance(9.5)
        await store.keepalive(lease)  # still alive: its TTL restarted at open
        clock.advance(10)
        assert [i.key for i in (await store.range("inst/"))[1]] == []
        with pytest.raises(LeaseNotFound):
            await store.keepalive(lease)
    finally:
        await store.close()

    store = SQLiteStore(tmp_path, clock=FakeClock())
    try:
        revision, items = await store.range("inst/")
        assert items == [] and revision == 8  # the expiry was durable too
    finally:
        await store.close()


def test_a_missing_data_dir_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(StoreError, match=str(missing)):
        SQLiteStore(missing)


def test_the_lock_is_released_on_close(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path)
    with pytest.raises(StoreLocked):
        SQLiteStore(tmp_path)  # a second open file description conflicts, even in one process
    asyncio.run(first.close())
    asyncio.run(SQLiteStore(tmp_path).close())


HOLD = """
import sys, time
from meshlib.control import SQLiteStore
store = SQLiteStore(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
"""

CONTEND = """
import sys
from meshlib.control import SQLiteStore, StoreLocked
try:
    SQLiteStore(sys.argv[1])
except StoreLocked as error:
    print(error, flush=True)
    sys.exit(3)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A real second process holding ``tmp_path`` as its data dir until the test ends."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


def test_a_second_process_refuses_the_dir_naming_it_and_the_holder(
    tmp_path: Path, holder: subprocess.Popen[str]
) -> None:
    with pytest.raises(StoreLocked) as info:
        SQLiteStore(tmp_path)
    assert info.value.pid == holder.pid
    assert info.value.path == str(tmp_path)
    assert str(tmp_path) in str(info.value) and str(holder.pid) in str(info.value)
    assert (tmp_path / LOCK_FILE).read_text().strip() == str(holder.pid)


def test_a_second_registry_process_refuses_to_start(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path)
    try:
        result = subprocess.run(
            [sys.executable, "-c", CONTEND, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert result.returncode == 3, result.stderr
        assert str(tmp_path) in result.stdout and f"process {os.getpid()}" in result.stdout
    finally:
        asyncio.run(store.close())


def test_a_killed_holder_leaves_the_dir_usable(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
    finally:
        process.kill()
        process.wait(timeout=10)
    # The kernel drops a dead process's flock: no stale lock to clean up by hand.
    asyncio.run(SQLiteStore(tmp_path).close())
