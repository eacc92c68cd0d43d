"""The control plane: the registry's pure core and its stores (Memory, SQLite, etcd). The
service (:mod:`meshlib.control.app`, ``meshlib.registry_app``) and its client
(:mod:`meshlib.control.client`) are imported from their modules: they load the ASGI and TLS
machinery."""

from meshlib.control.etcd import EtcdStore
from meshlib.control.memory import MemoryStore
from meshlib.control.registry import (
    Instance,
    PolicyLog,
    PolicyVersion,
    Registry,
    RegistrySettings,
    VersionConflict,
    instance_id,
)
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
    StoreUnavailable,
)

__all__ = [
    "Compacted",
    "Conflict",
    "EtcdStore",
    "Event",
    "EventKind",
    "Instance",
    "Item",
    "LeaseNotFound",
    "MemoryStore",
    "PolicyLog",
    "PolicyVersion",
    "Registry",
    "RegistrySettings",
    "SQLiteStore",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreLocked",
    "StoreUnavailable",
    "VersionConflict",
    "instance_id",
]
