"""The client's cache file: the last discovery state written after every applied snapshot, so a
workload restarted while the registry is away starts from what it last knew (CONTROL-PLANE.md
§5) instead of from the static endpoints alone.

The file is JSON, written atomically (temp file, fsync, rename) and mode 0600 from creation: it
names every instance of every watched service. Loading validates every field; a corrupt file,
a file of another format version or of another registry is refused with a :class:`CacheError`
naming the file and the field — the caller logs it and starts without the cache, never crashes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlib.config.model import Endpoint
from meshlib.control.discovery import DiscoveryState, ServiceState
from meshlib.identity.ca import write_atomic

log = logging.getLogger("meshlib.control")

#: The file's format version; another one is refused (written by a newer or older meshlib).
CACHE_FORMAT = 1
#: Owner read/write only: the file lists the mesh's instances.
CACHE_MODE = 0o600
#: A cache file larger than this is not one this module wrote for any sane mesh.
MAX_CACHE_BYTES = 64 * 1024 * 1024


class CacheError(ValueError):
    """A cache file that cannot be used; the message names the file and what was wrong."""


@dataclass(frozen=True)
class CachedState:
    """A loaded cache file: the discovery state and when it was fetched (unix seconds)."""

    registry: str
    state: DiscoveryState
    fetched_at: float


def cache_document(registry: str, state: DiscoveryState, fetched_at: float) -> dict[str, Any]:
    """The JSON document of the file. A service last seen in another epoch than the file's is
    written with index 0, so its watch asks at once instead of waiting on a foreign index."""
    return {
        "format": CACHE_FORMAT,
        "registry": registry,
        "epoch": state.epoch,
        "policy": {"version": state.policy_version, "text": state.policy_text},
        "services": {
            key: {
                "index": s.index if s.epoch == state.epoch else 0,
                "endpoints": [
                    {"address": e.address, "weight": e.weight, "labels": dict(e.labels)}
                    for e in s.endpoints
                ],
            }
            for key, s in sorted(state.services.items())
        },
        "fetched_at": fetched_at,
    }


def write_cache(path: Path, registry: str, state: DiscoveryState, fetched_at: float) -> None:
    data = json.dumps(cache_document(registry, state, fetched_at), indent=1).encode()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the default dir may not exist
    write_atomic(path, data, mode=CACHE_MODE)


def load_cache(path: Path, registry: str) -> CachedState:
    """Read and validate ``path``; raises :class:`CacheError` (never anything else for a bad
    file; OSError is turned into one too)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CACHE_BYTES + 1)
    except OSError as exc:
        raise CacheError(f"{path}: cannot read the cache file: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CACHE_BYTES:
        raise CacheError(f"{path}: larger than {MAX_CACHE_BYTES} bytes: not a cache file")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path}: not a JSON cache file: {exc}") from exc
    where = str(path)
    obj = _object(doc, where)
    version = _field(obj, "format", int, where)
    if version != CACHE_FORMAT:
        raise CacheError(f"{where}: format {version} is not {CACHE_FORMAT} (another meshlib?)")
    url = _field(obj, "registry", str, where)
    if url != registry:
        raise CacheError(f"{where}: written for registry {url!r}, not {registry!r}")
    epoch = _field(obj, "epoch", str, where)
    policy = _object(_field(obj, "policy", dict, where), f"{where}: policy")
    policy_version = _field(policy, "version", int, f"{where}: policy")
    if policy_version < 0:
        raise CacheError(f"{where}: policy: version must be >= 0, got {policy_version}")
    policy_text = _field(policy, "text", str, f"{where}: policy")
    services: dict[str, ServiceState] = {}
    for key, body in _field(obj, "services", dict, where).items():
        at = f"{where}: services[{key!r}]"
        name, dot, namespace = key.partition(".")
        if not (name and dot and namespace):
            raise CacheError(f"{at}: the key is not 'name.namespace'")
        service = _object(body, at)
        index = _field(service, "index", int, at)
        if index < 0:
            raise CacheError(f"{at}: index must be >= 0, got {index}")
        endpoints = tuple(
            _endpoint(item, f"{at}: endpoints[{i}]")
            for i, item in enumerate(_field(service, "endpoints", list, at))
        )
        services[key] = ServiceState(index, epoch, endpoints)
    fetched = _field(obj, "fetched_at", (int, float), where)
    state = DiscoveryState(epoch, policy_version, policy_text, services)
    return CachedState(url, state, float(fetched))


class CacheFile:
    """The cache file of one registry: :meth:`write` is discovery's ``persist`` callback,
    :meth:`load` returns None (and logs why) for a missing, corrupt or foreign file."""

    def __init__(
        self, path: str | os.PathLike[str], registry: str, *, wall: Callable[[], float] = time.time
    ) -> None:
        self.path = Path(path)
        self.registry = registry
        self._wall = wall

    def write(self, state: DiscoveryState) -> None:
        write_cache(self.path, self.registry, state, self._wall())

    def load(self) -> CachedState | None:
        if not self.path.exists():
            return None
        try:
            return load_cache(self.path, self.registry)
        except CacheError as exc:
            log.warning("discovery cache ignored: %s", exc)
            return None


def _object(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise CacheError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _field(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in obj:
        raise CacheError(f"{where}: field {name!r} is missing")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise CacheError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _endpoint(item: object, where: str) -> Endpoint:
    obj = _object(item, where)
    address = _field(obj, "address", str, where)
    host, colon, port = address.rpartition(":")
    if not host or not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise CacheError(f"{where}: address {address!r} is not 'host:port'")
    weight = _field(obj, "weight", int, where)
    if weight < 0:
        raise CacheError(f"{where}: weight must be >= 0, got {weight}")
    labels = _object(_field(obj, "labels", dict, where), f"{where}: labels")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise CacheError(f"{where}: labels must be a map of strings")
    return Endpoint(address, weight, dict(labels))
