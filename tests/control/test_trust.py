"""Trust bundle and CRL distribution through the registry (``GET /v1/ca/bundle`` and the
client's :class:`~meshlib.control.trust.BundleWatcher`): a real registry (uvicorn, strict mTLS,
SQLite) polling its real CA dir, real registry-backed meshes writing real SVID dirs, real TLS
handshakes refused after a revocation (RELIABILITY.md SEC-6, SEC-7 through the network path)."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshlib
from meshlib.cli.main import main as meshctl
from meshlib.control.client import RegistryNotFound
from meshlib.control.trust import BundleWatcher, plan_update
from meshlib.control.wire import BundleAnswer
from meshlib.identity.bundle import TrustBundle, load_bundle
from meshlib.identity.cadir import CADirectory
from meshlib.identity.crl import CRL_FILE
from meshlib.identity.spiffe import SpiffeID
from tests.control.conftest import TD, RunningRegistry, StartRegistry
from tests.control.fakes import mesh_policy
from tests.control.waiting import until

pytestmark = pytest.mark.timeout(60)

POLICY = mesh_policy(TD, "reviews", "ratings", "productpage", mtls="strict")


@pytest.fixture
def meshes(registry: RunningRegistry, tmp_path: Path) -> Iterator[Callable[..., meshlib.Mesh]]:
    made: list[meshlib.Mesh] = []

    def make(service: str, svid_dir: Path | None = None) -> meshlib.Mesh:
        mesh = meshlib.Mesh.from_registry(
            registry.url,
            service=service,
            svid_dir=svid_dir or registry.issue("default", service),
            cache_dir=tmp_path / f"cache-{service}",
            metrics=False,
            watch_wait=5.0,
        )
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["server"][1].to_bytes(2, "big")})


def endpoints_of(mesh: meshlib.Mesh, name: str) -> set[str]:
    found = mesh.discovered().get(f"{name}.default")
    return set() if found is None else {e.address for e in found.endpoints}


def _sequence(svid_dir: Path) -> int:
    return load_bundle(svid_dir / "bundle.pem").sequence


# -- the registry's endpoint -------------------------------------------------------------------


def test_the_bundle_answers_the_ca_dirs_bundle_and_crls_to_any_svid(
    registry: RunningRegistry,
) -> None:
    workload = registry.issue("default", "reviews")
    answer = registry.client(workload).bundle()
    published = CADirectory(registry.dir.ca).bundle()
    assert answer.sequence == published.sequence == 1 and answer.index >= 1
    assert answer.bundle.encode() == published.to_pem() and answer.crls == ""
    assert answer.epoch  # the index's epoch, from the response header


def test_a_registry_without_a_ca_dir_serves_no_bundle(registry_factory: StartRegistry) -> None:
    registry = registry_factory(ca=False)
    with pytest.raises(RegistryNotFound, match="without a CA dir"):
        registry.client().bundle()


def test_a_blocking_bundle_query_wakes_on_a_change_and_only_then(
    registry: RunningRegistry,
) -> None:
    workload = registry.issue("default", "reviews")
    client = registry.client(workload)
    first = client.bundle()
    held = threading.Event()
    registry.app.on_watchers = lambda n: held.set() if n == 1 else None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.bundle, index=first.index, wait=30.0, epoch=first.epoch)
        assert held.wait(10)
        woken = registry.app.wakeups
        # Neither an unrelated change nor a poll of an unchanged CA dir wakes it ...
        registry.client().apply(POLICY)
        assert registry.poll_ca() is False
        # ... nor a file rewritten with the same bytes (touched, not changed).
        crl_free = registry.dir.ca / "bundle.pem"
        crl_free.write_bytes(crl_free.read_bytes())
        assert registry.poll_ca() is False
        assert registry.app.wakeups == woken and not waiting.done()
        # A revocation list (sequence unchanged) is a change: the query answers with it.
        CADirectory(registry.dir.ca).revoke([])
        registry.poll_ca()  # the tick may have seen it first: either wakes the query
        answer = waiting.result(10)
    assert registry.app.wakeups == woken + 1
    assert answer.index == first.index + 1 and answer.sequence == first.sequence
    assert answer.crls.encode() == (registry.dir.ca / CRL_FILE).read_bytes()
    # An index from another epoch (a restarted registry) is answered at once, never held.
    again = client.bundle(index=answer.index, wait=30.0, epoch="another-life")
    assert again.index == answer.index


def test_a_ca_file_that_does_not_parse_keeps_the_last_good_bundle(
    registry: RunningRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    workload = registry.issue("default", "reviews")
    before = registry.client(workload).bundle()
    crl = registry.dir.ca / CRL_FILE
    caplog.set_level(logging.ERROR, logger="meshlib.registry")  # the tick's thread too
    crl.write_bytes(b"-----BEGIN X509 CRL-----\nhalf written")  # not atomic: mid-write
    registry.poll_ca()  # or the 1 s tick before it: one of them reads the bad file and logs
    assert registry.client(workload).bundle() == before
    assert any("keeping the last bundle" in r.getMessage() for r in caplog.records)
    crl.unlink()
    CADirectory(registry.dir.ca).revoke([])  # a good file again: published
    assert until(lambda: registry.client(workload).bundle().index > before.index)


# -- what a workload writes (pure) -------------------------------------------------------------


def _answer(bundle: TrustBundle, crls: bytes = b"", index: int = 1) -> BundleAnswer:
    return BundleAnswer(index, bundle.sequence, bundle.to_pem().decode(), crls.decode())


def test_a_lower_sequence_is_never_written_nor_its_crls(tmp_path: Path) -> None:
    ca = CADirectory(tmp_path / "ca")
    ca.init(TD)
    old = ca.bundle()
    ca.revoke([])
    old_crls = (tmp_path / "ca" / CRL_FILE).read_bytes()
    ca.rotate()
    new = ca.bundle()
    new_crls = (tmp_path / "ca" / CRL_FILE).read_bytes()
    # The workload holds sequence 2; a registry behind offers 1 with its older CRLs.
    stale = plan_update(_answer(old, old_crls), new.to_pem(), new_crls, "svid")
    assert stale.bundle is None and stale.crls is None
    assert stale.refused is not None and "lower than 2" in stale.refused
    # The same sequence: nothing to write; a higher one: written, its CRLs too.
    assert plan_update(_answer(new, new_crls), new.to_pem(), new_crls, "svid") == (
        plan_update(_answer(new), new.to_pem(), None, "svid")
    )
    fresh = plan_update(_answer(new, new_crls), old.to_pem(), old_crls, "svid")
    assert fresh.bundle == new.to_pem() and fresh.crls == new_crls and fresh.refused is None


def test_an_older_crl_is_never_written(tmp_path: Path) -> None:
    ca = CADirectory(tmp_path / "ca")
    ca.init(TD)
    bundle = ca.bundle()
    ca.revoke([])
    older = (tmp_path / "ca" / CRL_FILE).read_bytes()
    ca.issue(SpiffeID.parse(f"spiffe://{TD}/ns/default/sa/x"), out=tmp_path / "leaf")
    ca.revoke([tmp_path / "leaf" / "cert.pem"])
    newer = (tmp_path / "ca" / CRL_FILE).read_bytes()
    update = plan_update(_answer(bundle, older), bundle.to_pem(), newer, "svid")
    assert update.crls is None and update.refused is not None and "un-revoke" in update.refused
    # no CRLs in the answer never removes the file's
    assert plan_update(_answer(bundle), bundle.to_pem(), newer, "svid").crls is None


# -- through the network -----------------------------------------------------------------------


def test_a_stale_registry_does_not_roll_a_workloads_bundle_back(
    registry: RunningRegistry,
) -> None:
    from meshlib.control.agent import ClientSource
    from meshlib.control.client import AsyncRegistryClient

    workload = registry.issue("default", "reviews")
    held = load_bundle(workload / "bundle.pem")
    ahead = TrustBundle(held.roots, held.sequence + 4).to_pem()  # the workload saw sequence 5
    (workload / "bundle.pem").write_bytes(ahead)
    source = ClientSource(AsyncRegistryClient(registry.url, svid_dir=str(workload)))
    watcher = BundleWatcher(source, workload, wait=2.0).start()
    try:
        assert until(lambda: watcher.answers >= 1)
        assert (workload / "bundle.pem").read_bytes() == ahead
        assert watcher.refused is not None and "lower than 5" in watcher.refused
        assert watcher.writes == 0
    finally:
        watcher.stop()


def test_a_root_rotation_reaches_a_running_mesh(
    registry: RunningRegistry, meshes: Callable[..., meshlib.Mesh]
) -> None:
    registry.client().apply(POLICY)
    svid_dir = registry.issue("default", "reviews")
    mesh = meshes("reviews", svid_dir)
    assert mesh.svid is not None and len(mesh.svid.bundle) == 1
    assert meshctl(["ca", "rotate", "--dir", str(registry.dir.ca)]) == 0
    # registry poll (1 s) + the held query + the mesh's rotation watcher (1 s, settled)
    assert until(lambda: _sequence(svid_dir) == 2)
    assert until(lambda: mesh.svid is not None and len(mesh.svid.bundle) == 2)
    assert set(mesh.svid.bundle) == set(CADirectory(registry.dir.ca).bundle().roots)
    assert mesh.svid.bundle_sequence == 2


def test_a_revoked_server_is_refused_and_another_keeps_working(
    registry: RunningRegistry, meshes: Callable[..., meshlib.Mesh]
) -> None:
    registry.client().apply(POLICY)
    reviews_dir = registry.issue("default", "reviews")
    ratings_dir = registry.issue("default", "ratings")
    reviews, ratings = meshes("reviews", reviews_dir), meshes("ratings", ratings_dir)
    productpage = meshes("productpage")
    servers = [
        meshlib.serve(_ok, mesh=reviews, svid_dir=str(reviews_dir), mode="strict"),
        meshlib.serve(_ok, mesh=ratings, svid_dir=str(ratings_dir), mode="strict"),
    ]
    try:
        for name, server in zip(("reviews", "ratings"), servers, strict=True):
            address = f"127.0.0.1:{server.port}"
            assert until(lambda n=name, a=address: endpoints_of(productpage, n) == {a})
            with productpage.client() as client:
                assert client.get(f"http://{name}/").status_code == 200
        CADirectory(registry.dir.ca).revoke([reviews_dir / "cert.pem"])

        def refused() -> bool:
            with productpage.client() as client:  # a new client: a new handshake
                try:
                    client.get("http://reviews/")
                except httpx.HTTPError:
                    return True
            return False

        assert until(refused)  # registry poll + held query + the caller's rotation watcher
        with productpage.client() as client, pytest.raises(httpx.ConnectError, match="revoked"):
            client.get("http://reviews/")
        for _ in range(3):  # the unrevoked server is unaffected
            with productpage.client() as client:
                assert client.get("http://ratings/").status_code == 200
        assert productpage.svid is not None and productpage.svid.crls is not None
    finally:
        for server in servers:
            server.stop()
