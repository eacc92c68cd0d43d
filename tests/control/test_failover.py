"""Clients with several registry URLs (CONTROL-PLANE.md §5, issue 13): a connect failure is
retried at once on the next URL; a registry that stops is left for the next one by every part
of a workload (the registrar, every watch, the trust bundle watcher), with no failed mesh call.

The registries are real (uvicorn, strict mTLS); a "dead" URL is a loopback port bound and not
listening, so a connection to it is refused and nothing else can take the port meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import meshlib
from meshlib.cli.main import main
from meshlib.control.client import (
    AsyncRegistryClient,
    RegistryClient,
    RegistryUnavailable,
    RegistryURLs,
    registry_urls,
)
from meshlib.control.registry import RegistrySettings
from meshlib.control.store import Store
from meshlib.identity.tls import SVIDSource
from tests.control.conftest import TD, RunningRegistry, StartRegistry
from tests.control.test_app_consistency import FailingStore
from tests.control.test_registry_faults import POLICY, Recorder, Traffic
from tests.control.waiting import endpoints_of, until


@pytest.fixture
def dead() -> Iterator[str]:
    """A registry URL nothing listens at: a connection to it is refused."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"https://127.0.0.1:{held.getsockname()[1]}"


def second_registry(
    registry_factory: StartRegistry, first: RunningRegistry, tmp_path: Path, *, policy: bool = True
) -> RunningRegistry:
    """Another registry on a store of its own, with ``first``'s CA (every SVID works at both):
    it knows nothing of ``first``'s instances (``policy``: it has the same policy); warming,
    so its answers may not empty a set."""
    data = tmp_path / "second"
    data.mkdir()
    shutil.copytree(first.data / "ca", data / "ca")
    second = registry_factory(data, settings=RegistrySettings(warming=5.0))
    if policy:
        second.client().apply(POLICY)
    return second


# --- the client -------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_a_dead_first_url_is_skipped_at_once(registry: RunningRegistry, dead: str) -> None:
    with RegistryClient([dead, registry.url], svid_dir=str(registry.admin_svid)) as client:
        assert client.urls == (dead, registry.url)
        assert client.status().state == "serving"  # the first call, no retry by the caller
        assert client.url == registry.url  # and the next call goes there first


@pytest.mark.timeout(20)
def test_the_async_client_skips_a_dead_url_too(registry: RunningRegistry, dead: str) -> None:
    async def first_call() -> tuple[str, str]:
        urls = f"{dead}, {registry.url}/"  # one string, as MESHLIB_REGISTRY holds it
        async with AsyncRegistryClient(urls, svid_dir=str(registry.admin_svid)) as client:
            return (await client.status()).state, client.url

    assert asyncio.run(first_call()) == ("serving", registry.url)


@pytest.mark.timeout(20)
def test_every_url_dead_is_one_error_naming_each(dead: str, registry: RunningRegistry) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        second = f"https://127.0.0.1:{other.getsockname()[1]}"
        client = RegistryClient([dead, second], svid_dir=str(registry.admin_svid))
        with client, pytest.raises(RegistryUnavailable) as caught:
            client.status()
    assert dead in caught.value.message and second in caught.value.message
    assert "no registry reachable" in caught.value.message


@pytest.mark.timeout(20)
def test_a_503_moves_the_next_call_to_the_next_url(
    registry_factory: StartRegistry, tmp_path: Path
) -> None:
    made: list[FailingStore] = []

    def wrap(store: Store) -> Store:
        made.append(FailingStore(store))
        return made[-1]

    first = registry_factory(wrap=wrap)
    second = second_registry(registry_factory, first, tmp_path, policy=False)
    (store,) = made
    with RegistryClient([first.url, second.url], svid_dir=str(first.admin_svid)) as client:
        assert client.status().epoch == first.client().status().epoch
        store.failing = True  # the first registry's store fails: its writes answer 503
        with pytest.raises(RegistryUnavailable) as caught:
            client.apply(POLICY)
        assert caught.value.status == 503  # raised as with one URL: the caller backs off
        assert client.url == second.url
        assert client.apply(POLICY).version == 1  # the next call goes to the second
        assert client.status().epoch == second.client().status().epoch
        # Only a failure of the current URL moves it: a late one of the URL already left (a
        # watch held there) changes nothing.
        client.registry.failed(first.url, "a late failure")
        assert client.url == second.url


def test_a_rotation_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    urls = RegistryURLs("https://a.test:1,https://b.test:2")
    urls.answered()
    with caplog.at_level(logging.DEBUG, logger="meshlib.control"):
        for _ in range(20):  # twenty watches held on a.test fail together
            urls.failed("https://a.test:1", "reset")
        moves = [r for r in caplog.records if "moving to" in r.getMessage()]
        assert [r.levelno for r in moves] == [logging.WARNING]
        assert urls.url == "https://b.test:2"
        urls.failed("https://b.test:2", "refused")  # b never answered: not news
    assert urls.url == "https://a.test:1"
    assert [r.levelno for r in caplog.records if "moving to" in r.getMessage()] == [
        logging.WARNING,
        logging.DEBUG,
    ]


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ("https://a.test:1,ftp://b.test", "registry URL #2 of 2 'ftp://b.test'"),
        (["https://a.test:1", "https://:9"], "registry URL #2 of 2 'https://:9'"),
        ("https://a.test:1,,https://c.test", "registry URL #2 of 3 is empty"),
        ("https://a.test:x", "registry URL 'https://a.test:x' has a bad port"),
        ("https://a.test:1,https://a.test:1/", "registry URL #2 of 2 'https://a.test:1'"),
        ([], "no registry URL given"),
    ],
)
def test_a_bad_url_in_the_list_is_named(given: Any, named: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(named)):
        registry_urls(given)


def test_a_bad_url_fails_from_registry_before_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"registry URL #2 of 2 'http//b\.test:2'"):
        meshlib.Mesh.from_registry(
            "https://a.test:1,http//b.test:2", service="reviews", svid_dir=tmp_path
        )


# --- a workload -------------------------------------------------------------------------------


@pytest.fixture
def meshes(tmp_path: Path) -> Iterator[Callable[..., meshlib.Mesh]]:
    made: list[meshlib.Mesh] = []

    def make(urls: list[str], svid_dir: Path, service: str, **kwargs: Any) -> meshlib.Mesh:
        mesh = meshlib.Mesh.from_registry(
            urls,
            service=service,
            svid_dir=svid_dir,
            cache_dir=tmp_path / f"cache-{service}",
            metrics=False,
            watch_wait=5.0,
            **kwargs,
        )
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()


@pytest.mark.timeout(40)
def test_a_workload_moves_to_the_next_registry_when_the_first_stops(
    registry_factory: StartRegistry,
    meshes: Callable[..., meshlib.Mesh],
    echo_factory: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = registry_factory()
    first.client().apply(POLICY)
    second = second_registry(registry_factory, first, tmp_path)
    urls = [first.url, second.url]
    backends = [echo_factory(name) for name in "ab"]
    reviews = meshes(urls, first.issue("default", "reviews"), "reviews")
    caller = meshes(urls, first.issue("default", "productpage"), "productpage")
    for backend in backends:
        reviews.register("127.0.0.1", backend.port, ttl=1.5)
    every = {f"127.0.0.1:{b.port}" for b in backends}
    assert until(lambda: endpoints_of(caller) == every)
    status = caller.registry_status()
    assert status is not None and status["url"] == first.url and status["urls"] == urls
    seen = Recorder(caller)
    traffic = Traffic(caller)
    caplog.set_level(logging.WARNING, logger="meshlib.control")
    try:
        first.stop()
        # The registrar's heartbeats reach the second registry, get 404 and register again.
        assert until(lambda: second.client().status().instances == 2, step=traffic.call)
        epoch = second.client().status().epoch

        def moved(mesh: meshlib.Mesh) -> bool:
            link = mesh.registry_status()
            return (
                link is not None
                and link["up"]
                and link["url"] == second.url
                and link["epoch"] == epoch
            )

        assert until(lambda: moved(caller) and moved(reviews), step=traffic.call)
        # The watches answer from the second registry: a new instance registered there now
        # reaches the caller.
        third = echo_factory("c")
        reviews.register("127.0.0.1", third.port, ttl=1.5)
        every.add(f"127.0.0.1:{third.port}")
        assert until(lambda: endpoints_of(caller) == every, step=traffic.call)
        assert until(lambda: "c" in traffic.backends, step=traffic.call)
        # The heartbeats go on at the second registry: once it has warmed up and expires
        # instances, none of the three does over two TTLs.
        assert until(lambda: second.client().status().state == "serving", step=traffic.call)
        assert not until(
            lambda: second.client().status().instances < 3, timeout=3.0, step=traffic.call
        )
        assert traffic.failures == []
        assert all(len(s) >= 2 for s in seen.seen()), seen.seen()
        # Every watch, the registrar and the bundle watcher of each mesh left the first
        # registry, but each mesh said so once.
        moves = [r for r in caplog.records if "moving to" in r.getMessage()]
        assert len(moves) <= 2, [r.getMessage() for r in moves]
    finally:
        traffic.close()


@pytest.mark.timeout(30)
def test_meshlib_registry_with_two_urls(
    registry: RunningRegistry, dead: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    registry.client().apply(POLICY)
    monkeypatch.setenv("MESHLIB_SERVICE", "reviews")
    monkeypatch.setenv("MESHLIB_REGISTRY", f"{dead}, {registry.url}")
    monkeypatch.setenv("MESHLIB_SVID_DIR", str(registry.issue("default", "reviews")))
    monkeypatch.delenv("MESHLIB_POLICY", raising=False)
    monkeypatch.delenv("MESHLIB_JOIN_TOKEN", raising=False)
    with meshlib.Mesh.from_env(cache_dir=tmp_path, metrics=False, watch_wait=5.0) as mesh:
        link = mesh.registry_status()
        assert link is not None and link["urls"] == [dead, registry.url]
        assert link["started_from"] == "registry"  # the dead URL did not cost the start-up
        assert until(lambda: (mesh.registry_status() or {}).get("up") is True)
        assert link["url"] == registry.url  # start-up moved every part past the dead one


@pytest.mark.timeout(20)
def test_meshctl_registry_takes_a_list(
    registry: RunningRegistry, dead: str, capsys: pytest.CaptureFixture[str]
) -> None:
    svid = str(registry.admin_svid)
    code = main(["registry", "status", "--registry", f"{dead},{registry.url}", "--svid-dir", svid])
    found = capsys.readouterr()
    assert code == 0, found.err
    assert "serving" in found.out
    code = main(["registry", "status", "--registry", f"{dead},x:99999", "--svid-dir", svid])
    assert code != 0
    assert "registry URL #2 of 2 'https://x:99999' has a bad port" in capsys.readouterr().err


def test_meshctl_status_shows_the_current_registry() -> None:
    from meshlib.cli.observe import format_status

    link = {
        "url": "https://b.test:2",
        "urls": ["https://a.test:1", "https://b.test:2"],
        "up": True,
        "epoch": "e1",
        "policy_version": 1,
        "services": {},
    }
    text = format_status(_status_with(link), {"destinations": []})
    assert "registry:     https://b.test:2 (2 of 2) up" in text


def _status_with(link: dict[str, Any]) -> dict[str, Any]:
    plain = meshlib.Mesh.from_text(POLICY, service="reviews", metrics=False)
    try:
        from meshlib.observe.admin import status

        found = status(plain)
    finally:
        plain.close()
    return {**found, "registry": link, "trust_domain": TD}


@pytest.mark.timeout(30)
def test_a_join_string_bootstraps_at_its_registry_then_the_list_is_used(
    registry: RunningRegistry, dead: str, tmp_path: Path
) -> None:
    from tests.control.test_bootstrap import REVIEWS, join_string

    registry.client().apply(POLICY)
    join = join_string(registry, REVIEWS)
    svid_dir = tmp_path / "svid"
    with pytest.raises(ValueError, match="the join string is for the registry at"):
        meshlib.Mesh.from_registry(
            [dead], service="reviews", svid_dir=svid_dir, join_token=join, metrics=False
        )
    with meshlib.Mesh.from_registry(
        [dead, registry.url],
        service="reviews",
        svid_dir=svid_dir,
        join_token=join,
        cache_dir=tmp_path / "cache",
        metrics=False,
        watch_wait=5.0,
    ) as mesh:
        assert SVIDSource(svid_dir).spiffe_id == REVIEWS
        link = mesh.registry_status()
        assert link is not None and link["started_from"] == "registry"
        assert link["urls"] == [dead, registry.url] and link["url"] == registry.url


@pytest.mark.timeout(30)
def test_a_bare_token_with_a_bundle_bootstraps_past_a_dead_registry(
    registry: RunningRegistry, dead: str, tmp_path: Path
) -> None:
    from tests.control.test_bootstrap import REVIEWS

    token = registry.client().create_token(str(REVIEWS)).token
    svid_dir = tmp_path / "svid"
    with meshlib.Mesh.from_registry(
        f"{dead},{registry.url}",
        service="reviews",
        svid_dir=svid_dir,
        join_token=token,
        bundle=registry.admin_svid / "bundle.pem",
        cache_dir=tmp_path / "cache",
        metrics=False,
        renew=False,
    ):
        assert SVIDSource(svid_dir).spiffe_id == REVIEWS
