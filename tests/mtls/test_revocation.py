"""Revocation under real mTLS (SEC-6): a client leaf is revoked with ``meshctl ca revoke``, the
new crl.pem is copied into the server's SVID directory, and within the watcher's refresh bound
new handshakes from that client fail while another client's calls never do. A keep-alive
connection opened before the revocation goes on until it is closed (documented behaviour)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.cli import main
from meshlib.identity import SpiffeID
from meshlib.identity.cadir import CADirectory

from .conftest import CLIENT_ID, TD, mesh_text
from .test_rotation import POLL, REVIEWS_ID, Load, _echo_serials, _wait

pytestmark = pytest.mark.timeout(60)

RATINGS_ID = SpiffeID.for_workload(TD, "default", "ratings")
#: The refresh bound in this test: the watcher needs a poll to see the change and one more to
#: let it settle; a generous multiple absorbs a loaded CI machine.
BOUND = 40 * POLL


@dataclass
class Clients:
    cadir: CADirectory
    server: Any
    web: meshlib.Mesh  # to be revoked
    ratings: meshlib.Mesh  # unaffected
    root: Path


def _client_mesh(port: int, svid_dir: Path, service: str) -> meshlib.Mesh:
    text = (
        mesh_text("strict")
        + "---\napiVersion: meshlib/v1\nkind: Service\n"
        + "metadata: {name: reviews, namespace: default}\n"
        + f'spec: {{endpoints: [{{address: "127.0.0.1:{port}"}}]}}\n'
    )
    return meshlib.Mesh.from_text(
        text,
        service=service,
        seed=7,
        registry=CollectorRegistry(),
        svid_dir=str(svid_dir),
        svid_poll_interval=POLL,
    )


@pytest.fixture
def clients(tmp_path: Path) -> Iterator[Clients]:
    from meshlib.inbound.serving import serve

    cadir = CADirectory(tmp_path / "ca")
    cadir.init(TD)
    cadir.revoke([])  # CRL checking on from the start, with an empty CRL
    for sid, name in ((REVIEWS_ID, "reviews"), (CLIENT_ID, "web"), (RATINGS_ID, "ratings")):
        cadir.issue(sid, out=tmp_path / name)
    server_mesh = meshlib.Mesh.from_text(
        mesh_text("strict"), service="reviews", seed=7, registry=CollectorRegistry()
    )
    server = serve(
        _echo_serials,
        mesh=server_mesh,
        svid_dir=str(tmp_path / "reviews"),
        svid_poll_interval=POLL,
        lifespan="off",
        timeout_keep_alive=30,
    )
    web = _client_mesh(server.port, tmp_path / "web", "web")
    ratings = _client_mesh(server.port, tmp_path / "ratings", "ratings")
    try:
        yield Clients(cadir, server, web, ratings, tmp_path)
    finally:
        web.close()
        ratings.close()
        server.stop()
        server_mesh.close()


def _fresh_call(mesh: meshlib.Mesh) -> httpx.Response:
    with mesh.client(timeout=5.0) as client:
        return client.get("http://reviews/")


def test_revoked_client_is_refused_within_the_refresh_bound_others_unaffected(
    clients: Clients, capsys: pytest.CaptureFixture[str]
) -> None:
    """SEC-6: revoke a client leaf (CRL); new handshakes with it fail within the refresh
    interval, the other client never fails, the server never reloads an error."""
    assert clients.server.svid.crls is not None
    load = Load(clients.ratings, "http://reviews/").start()
    try:
        assert _fresh_call(clients.web).status_code == 200
        # a keep-alive connection opened now, outside the mesh's breaker (which the refused
        # calls below open for the web mesh)
        assert clients.web.svid is not None
        context = clients.web.svid.client_context()
        with httpx.Client(verify=context, timeout=5.0) as kept:
            assert kept.get(clients.server.url).status_code == 200

            cert = clients.root / "web" / "cert.pem"
            ca = str(clients.cadir.path)
            assert main(["ca", "revoke", "--dir", ca, str(cert)]) == 0
            assert "revoked serial" in capsys.readouterr().out
            tmp = clients.root / "reviews" / ".crl.pem.tmp"
            tmp.write_bytes((clients.cadir.path / "crl.pem").read_bytes())
            published = time.monotonic()
            os.replace(tmp, clients.root / "reviews" / "crl.pem")

            refused = threading.Event()

            def web_refused() -> bool:
                try:
                    _fresh_call(clients.web)
                except httpx.TransportError:
                    refused.set()
                return refused.is_set()

            _wait(web_refused, "the revoked client to be refused", timeout=BOUND * 2)
            took = time.monotonic() - published
            assert took < BOUND, f"revocation took {took:.2f}s, bound {BOUND:.2f}s"
            for _ in range(3):  # and it stays refused
                with pytest.raises(httpx.TransportError):
                    _fresh_call(clients.web)
            # the keep-alive connection opened before the revocation is not closed by it
            assert kept.get(clients.server.url).status_code == 200
            # while a new connection with the same credentials is refused
            with (
                httpx.Client(verify=context, timeout=5.0) as fresh,
                pytest.raises(httpx.TransportError),
            ):
                fresh.get(clients.server.url)

        n = len(load.fresh)
        _wait(lambda: len(load.fresh) > n + 3, "more calls from the unrevoked client")
    finally:
        load.close()
    assert load.failures == []
    status = clients.server.svid_status
    assert status is not None and status.last_error is None and status.reloads >= 1
