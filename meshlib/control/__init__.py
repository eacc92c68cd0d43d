"""The control plane: the registry's store (and, as issue 11 lands, the registry itself)."""

from meshlib.control.memory import MemoryStore
from meshlib.control.sqlite import SQLiteStore
from meshlib.control.store import (
    Compacted,
    Conflict,
    Event,
    EventKind,
    Item,
    LeaseNotFound,
    Store,
    StoreClosed,
    StoreError,
    StoreLocked,
)

__all__ = [
    "Compacted",
    "Conflict",
    "Event",
    "EventKind",
    "Item",
    "LeaseNotFound",
    "MemoryStore",
    "SQLiteStore",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreLocked",
]
