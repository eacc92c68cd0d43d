"""The registry's default store: a :class:`~meshlib.control.memory.MemoryStore` whose every
change is first committed to a SQLite file in the data dir, and which one process owns.

Why this shape:

* **Reads from memory, writes through.** The registry's data is small (thousands of keys), so
  the whole state lives in memory and ``range`` never touches the file; each write is one SQLite
  transaction committed before the change becomes visible, so a crash loses nothing that was
  acknowledged to a caller (short of power loss: see ``synchronous``).
* **Queries run on the event loop, not in a thread.** In WAL mode with ``synchronous=NORMAL`` a
  commit appends to the WAL without an fsync (the fsync happens at checkpoints), which takes tens
  of microseconds; a thread hop would cost as much as the query and would break the property the
  compare-and-set relies on — each write runs to completion without awaiting, so no two writes
  interleave. ``synchronous=NORMAL`` in WAL mode keeps the database consistent across a crash of
  the process; a power loss can lose the last transactions, not corrupt the file.
* **One process per data dir.** ``DIR/registry.lock`` is held with a non-blocking
  ``fcntl.flock`` for the life of the store and holds the owner's pid; a second store on the same
  dir (a second registry process) raises :class:`~meshlib.control.store.StoreLocked` naming the
  dir and that pid. No split brain: high availability is etcd's job, not several writers here.
* **Leases across a restart.** A lease is stored with its TTL, not its deadline (the clock is
  monotonic, meaningless in another process, and a heartbeat then costs no disk write). When the
  store opens, every lease restarts its full TTL: a live instance heartbeats within that time
  and keeps its keys, a dead one expires one TTL after the restart — never all at once because
  the registry was down longer than a TTL. This matches CONTROL-PLANE.md §5 (a restarted
  registry is not authoritative for one TTL).
* **History** for watches is the ``events`` table, trimmed to the last ``history`` revisions;
  the revision counter, the compaction point and the next lease id live in ``meta``.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TextIO

from meshlib.control.memory import DEFAULT_HISTORY, JournalEntry, MemoryStore, State
from meshlib.control.store import Event, EventKind, Item, Put, StoreError, StoreLocked

__all__ = ["DB_FILE", "LOCK_FILE", "SQLiteStore"]

#: The database and lock file inside the data dir.
DB_FILE = "registry.db"
LOCK_FILE = "registry.lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, mod_revision INTEGER NOT NULL, lease INTEGER
);
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL, key TEXT NOT NULL, kind TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (revision, key)
);
"""


class SQLiteStore:
    """The :class:`~meshlib.control.store.Store` protocol over ``DIR/registry.db``; raises
    :class:`~meshlib.control.store.StoreLocked` if another process owns ``data_dir``."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        history: int = DEFAULT_HISTORY,
    ) -> None:
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise StoreError(
                f"{self.data_dir}: no such registry data dir (create it with "
                f"`meshctl registry init --data {self.data_dir}`)"
            )
        self._lock = _acquire_lock(self.data_dir / LOCK_FILE)
        db: sqlite3.Connection | None = None
        try:
            # check_same_thread off: meshctl opens the store in its main thread (so a locked dir is
            # refused before serving) and the server's loop thread uses it; one thread at a time.
            self._db = db = sqlite3.connect(
                self.data_dir / DB_FILE, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            state = self._load()
            self._memory = MemoryStore(clock=clock, history=history, journal=self, state=state)
        except BaseException:
            if db is not None:
                db.close()
            self._lock.close()
            raise

    @property
    def wakeups(self) -> int:
        """How many times a waiting watcher was woken (see :attr:`MemoryStore.wakeups`)."""
        return self._memory.wakeups

    # -- the protocol: the memory store, journaled here ------------------------------------

    async def range(self, prefix: str) -> tuple[int, list[Item]]:
        return await self._memory.range(prefix)

    async def put(
        self, key: str, value: bytes, *, lease: int | None = None, if_mod_rev: int | None = None
    ) -> int:
        return await self._memory.put(key, value, lease=lease, if_mod_rev=if_mod_rev)

    async def put_all(self, puts: Sequence[Put]) -> int:
        return await self._memory.put_all(puts)

    async def delete(self, key: str, *, if_mod_rev: int | None = None) -> int:
        return await self._memory.delete(key, if_mod_rev=if_mod_rev)

    async def grant(self, ttl: int) -> int:
        return await self._memory.grant(ttl)

    async def keepalive(self, lease: int) -> None:
        await self._memory.keepalive(lease)

    async def revoke(self, lease: int) -> int:
        return await self._memory.revoke(lease)

    async def expire(self) -> int:
        return await self._memory.expire()

    def watch(self, prefix: str, after_rev: int) -> AsyncIterator[Event]:
        return self._memory.watch(prefix, after_rev)

    async def close(self) -> None:
        await self._memory.close()
        self._db.close()
        self._lock.close()  # closing the file releases the flock

    # -- the journal ------------------------------------------------------------------------

    def record(self, change: JournalEntry) -> None:
        """Commit ``change`` in one transaction (called by the memory store before it applies
        the change)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO kv (key, value, mod_revision, lease) VALUES (?, ?, ?, ?)",
                [(i.key, i.value, i.mod_revision, i.lease) for i in change.items],
            )
            db.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in change.deleted])
            db.executemany("INSERT INTO leases (id, ttl) VALUES (?, ?)", change.granted)
            db.executemany("DELETE FROM leases WHERE id = ?", [(x,) for x in change.revoked])
            db.executemany(
                "INSERT INTO events (revision, key, kind, value) VALUES (?, ?, ?, ?)",
                [(e.mod_revision, e.key, e.kind.value, e.value) for e in change.events],
            )
            db.execute("DELETE FROM events WHERE revision <= ?", (change.compacted,))
            db.executemany(
                "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                [
                    ("revision", change.revision),
                    ("compacted", change.compacted),
                    ("next_lease", change.next_lease),
                ],
            )
            db.execute("COMMIT")  # inside: a failed commit is rolled back, not left open
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _load(self) -> State:
        meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        return State(
            revision=meta.get("revision", 0),
            compacted=meta.get("compacted", 0),
            next_lease=meta.get("next_lease", 1),
            items=[
                Item(key, bytes(value), mod_revision, lease)
                for key, value, mod_revision, lease in self._db.execute(
                    "SELECT key, value, mod_revision, lease FROM kv ORDER BY key"
                )
            ],
            leases=dict(self._db.execute("SELECT id, ttl FROM leases").fetchall()),
            history=[
                Event(EventKind(kind), key, bytes(value), revision)
                for revision, key, kind, value in self._db.execute(
                    "SELECT revision, key, kind, value FROM events ORDER BY revision, key"
                )
            ],
        )


def _acquire_lock(path: Path) -> TextIO:
    """Hold ``path`` with a non-blocking exclusive flock and write our pid into it."""
    handle = open(path, "a+")  # noqa: SIM115 - held open for the life of the store
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        text = handle.read().strip()
        handle.close()
        raise StoreLocked(str(path.parent), int(text) if text.isdigit() else None) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
