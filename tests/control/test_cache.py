"""The discovery cache file: written atomically and 0600 from creation, read back field by field;
a corrupt or foreign file is refused with an error naming the file and the field (real files)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from meshlib.config.model import Endpoint
from meshlib.control.cache import (
    CACHE_FORMAT,
    CacheError,
    CacheFile,
    cache_document,
    load_cache,
    write_cache,
)
from meshlib.control.discovery import DiscoveryState, ServiceState

URL = "https://registry.example:8443"


def state() -> DiscoveryState:
    reviews = ServiceState(
        7,
        "e1",
        (Endpoint("127.0.0.1:9001", 1, {"version": "v2"}), Endpoint("[::1]:9002")),
    )
    ratings = ServiceState(3, "e0", (Endpoint("10.0.0.2:80"),))  # last seen in an older epoch
    return DiscoveryState(
        "e1", 4, "kind: Mesh\n", {"reviews.default": reviews, "ratings.default": ratings}
    )


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "discovery.json"
    write_cache(path, URL, state(), 1_700_000_000.5)
    loaded = load_cache(path, URL)
    assert loaded.fetched_at == 1_700_000_000.5
    assert loaded.registry == URL
    assert loaded.state.epoch == "e1"
    assert (loaded.state.policy_version, loaded.state.policy_text) == (4, "kind: Mesh\n")
    assert loaded.state.services["reviews.default"] == state().services["reviews.default"]
    # a service from another epoch comes back with index 0: its watch asks at once
    assert loaded.state.services["ratings.default"].index == 0
    assert loaded.state.services["ratings.default"].endpoints == (Endpoint("10.0.0.2:80"),)


def test_mode_is_0600_from_creation_even_under_a_wide_umask(tmp_path: Path) -> None:
    path = tmp_path / "discovery.json"
    path.write_text("old")
    path.chmod(0o644)
    old = os.umask(0)
    try:
        write_cache(path, URL, state(), 0.0)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["discovery.json"]  # no temp file left


def corrupt(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "discovery.json"
    path.write_text(json.dumps(doc))
    return path


def good() -> dict[str, object]:
    return cache_document(URL, state(), 5.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format=CACHE_FORMAT + 1), "format 2 is not 1"),
        (lambda d: d.update(registry="https://other:1"), "written for registry 'https://other:1'"),
        (lambda d: d.pop("epoch"), "field 'epoch' is missing"),
        (lambda d: d.update(fetched_at="yesterday"), "field 'fetched_at' has the wrong type"),
        (lambda d: d["policy"].update(version=True), "policy: field 'version' has the wrong"),
        (lambda d: d["policy"].update(version=-1), "version must be >= 0"),
        (lambda d: d["services"].update({"reviews": {}}), "services['reviews']: the key is not"),
        (
            lambda d: d["services"]["reviews.default"].update(index=-2),
            "services['reviews.default']: index must be >= 0",
        ),
        (
            lambda d: d["services"]["reviews.default"]["endpoints"][1].update(address="nohost"),
            "services['reviews.default']: endpoints[1]: address 'nohost' is not 'host:port'",
        ),
        (
            lambda d: d["services"]["reviews.default"]["endpoints"][0].update(labels={"a": 1}),
            "labels must be a map of strings",
        ),
    ],
)
def test_a_bad_field_is_named(tmp_path: Path, change: object, message: str) -> None:
    doc = good()
    change(doc)  # type: ignore[operator]
    path = corrupt(tmp_path, doc)
    with pytest.raises(CacheError) as info:
        load_cache(path, URL)
    assert str(path) in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"[]", b"null"])
def test_a_corrupt_file_is_refused_and_ignored_by_the_cache_file(
    tmp_path: Path, raw: bytes
) -> None:
    path = tmp_path / "discovery.json"
    path.write_bytes(raw)
    with pytest.raises(CacheError, match=r"discovery\.json"):
        load_cache(path, URL)
    assert CacheFile(path, URL).load() is None  # logged, never raised


def test_cache_file_writes_with_its_wall_clock_and_loads(tmp_path: Path) -> None:
    cache = CacheFile(tmp_path / "c.json", URL, wall=lambda: 123.0)
    assert cache.load() is None  # no file yet: nothing, no error
    cache.write(state())
    loaded = cache.load()
    assert loaded is not None and loaded.fetched_at == 123.0
    assert CacheFile(tmp_path / "c.json", "https://other:1").load() is None  # foreign
