"""Revoked *server* certificates under real mTLS (SEC-6): two ``meshlib.serve`` endpoints of one
service, a meshed client calling them; endpoint A's server SVID is revoked with
``meshctl ca revoke`` and the new crl.pem is published into the *client's* SVID directory only,
so whatever refuses A is the client's check. Within the watcher's refresh bound new connections
to A fail the handshake, calls are retried onto B, and A's app receives no further mesh request;
a keep-alive connection to A opened before the revocation goes on (documented behaviour).

The client applies revocation in two layers, each pinned by its own test so that removing either
one alone fails a test: OpenSSL (the CRLs loaded into the client context with
``VERIFY_CRL_CHECK_LEAF``) and meshlib's SPIFFE re-check of the server (``PeerVerifier`` calling
``verify_svid(..., crls=...)``), which catches a handshake made on a context that predates the
CRL."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.cli import main
from meshlib.decision import DECISION_EXTENSION, Decision
from meshlib.identity.cadir import CADirectory
from meshlib.outbound.mtls import PeerVerifier

from .conftest import CLIENT_ID, TD, mesh_text
from .test_rotation import POLL, REVIEWS_ID, _wait

pytestmark = pytest.mark.timeout(60)

#: The refresh bound (as in test_revocation.py): a poll to see the new crl.pem, one more to let
#: it settle, and a generous multiple for a loaded machine.
BOUND = 40 * POLL
#: OpenSSL's reason for a revoked peer leaf; meshlib's own re-check says "was revoked by".
OPENSSL_REVOKED = "certificate revoked"
SPIFFE_REVOKED = "was revoked by"


@dataclass
class Counting:
    """An ASGI app that answers 200 and records, per request, the ``x-probe`` header ("" for
    the mesh's calls) and the client's port (one port: one connection)."""

    name: str
    seen: list[tuple[str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        probe = dict(scope["headers"]).get(b"x-probe", b"").decode()
        with self.lock:
            self.seen.append((probe, scope["client"][1]))
        body = self.name.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def count(self, probe: str = "") -> int:
        with self.lock:
            return sum(1 for p, _ in self.seen if p == probe)

    def ports(self, probe: str) -> set[int]:
        with self.lock:
            return {port for p, port in self.seen if p == probe}


@dataclass
class Rig:
    cadir: CADirectory
    root: Path
    a: Any  # meshlib.inbound.serving.Server, revoked in the tests
    b: Any
    app_a: Counting
    app_b: Counting
    web: meshlib.Mesh

    def revoke_a(self) -> float:
        """``meshctl ca revoke`` A's leaf and publish crl.pem (atomically) into the client's
        SVID directory; the time it was published."""
        cert = self.root / "a" / "cert.pem"
        assert main(["ca", "revoke", "--dir", str(self.cadir.path), str(cert)]) == 0
        tmp = self.root / "web" / ".crl.pem.tmp"
        tmp.write_bytes((self.cadir.path / "crl.pem").read_bytes())
        published = time.monotonic()
        os.replace(tmp, self.root / "web" / "crl.pem")
        return published

    def probe(self, server: Any, client: httpx.Client | None = None) -> httpx.Response:
        """One request straight to ``server`` through the client mesh's mTLS transport (both
        client-side layers), on a new connection unless ``client`` is given."""
        url = f"https://127.0.0.1:{server.port}/"
        if client is not None:
            return client.get(url, headers={"x-probe": "kept"})
        with httpx.Client(transport=self.web.mtls_transport(), timeout=5.0) as fresh:
            return fresh.get(url, headers={"x-probe": "fresh"})


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    from meshlib.inbound.serving import serve

    cadir = CADirectory(tmp_path / "ca")
    cadir.init(TD)
    cadir.revoke([])  # CRL checking on from the start, with an empty CRL
    for sid, name in ((REVIEWS_ID, "a"), (REVIEWS_ID, "b"), (CLIENT_ID, "web")):
        cadir.issue(sid, out=tmp_path / name)
    servers: list[Any] = []
    meshes: list[meshlib.Mesh] = []
    apps = Counting("a"), Counting("b")
    try:
        for name, app in zip("ab", apps, strict=True):
            mesh = meshlib.Mesh.from_text(
                mesh_text("strict"), service="reviews", seed=7, registry=CollectorRegistry()
            )
            meshes.append(mesh)
            servers.append(
                serve(
                    app,
                    mesh=mesh,
                    svid_dir=str(tmp_path / name),
                    svid_poll_interval=POLL,
                    lifespan="off",
                    timeout_keep_alive=30,
                )
            )
        endpoints = ", ".join(f'{{address: "127.0.0.1:{s.port}"}}' for s in servers)
        text = (
            mesh_text("strict")
            + "---\napiVersion: meshlib/v1\nkind: Service\n"
            + "metadata: {name: reviews, namespace: default}\n"
            + f"spec: {{endpoints: [{endpoints}]}}\n"
        )
        web = meshlib.Mesh.from_text(
            text,
            service="web",
            seed=7,
            registry=CollectorRegistry(),
            svid_dir=str(tmp_path / "web"),
            svid_poll_interval=POLL,
        )
        meshes.append(web)
        assert web.svid is not None and web.svid.crls is not None
        yield Rig(cadir, tmp_path, servers[0], servers[1], apps[0], apps[1], web)
    finally:
        for server in servers:
            server.stop()
        for mesh in meshes:
            mesh.close()


def _call(mesh: meshlib.Mesh) -> httpx.Response:
    """A mesh call on a new connection (a fresh client, so no pooled connection is reused)."""
    with mesh.client(timeout=5.0) as client:
        return client.get("http://reviews/")


async def _acall(mesh: meshlib.Mesh) -> httpx.Response:
    async with mesh.async_client(timeout=5.0) as client:
        return await client.get("http://reviews/")


def _decision(response: httpx.Response) -> Decision:
    decision = response.extensions[DECISION_EXTENSION]
    assert isinstance(decision, Decision)
    return decision


def _wait_refused(rig: Rig, published: float) -> None:
    """Wait (bounded) until a new connection to A is refused; assert it took < BOUND."""

    def refused() -> bool:
        try:
            rig.probe(rig.a)
        except httpx.ConnectError:
            return True
        return False

    _wait(refused, "new connections to the revoked server to be refused", timeout=BOUND * 2)
    took = time.monotonic() - published
    assert took < BOUND, f"revocation took {took:.2f}s, bound {BOUND:.2f}s"


def test_revoked_server_is_refused_and_calls_go_to_the_other_endpoint(rig: Rig) -> None:
    """SEC-6, server side: after A's SVID is revoked, new connections to A fail in the client's
    handshake within the refresh bound, every call (sync and async) succeeds on B, some after a
    refused attempt on A, and A's app receives no further mesh request. A keep-alive connection
    to A opened before the revocation is not closed by it."""
    # both endpoints serve before the revocation
    _wait(lambda: _call(rig.web).text == "a", "a call served by A")
    _wait(lambda: _call(rig.web).text == "b", "a call served by B")
    with httpx.Client(transport=rig.web.mtls_transport(), timeout=5.0) as kept:
        assert rig.probe(rig.a, kept).text == "a"  # the keep-alive connection to A

        published = rig.revoke_a()
        _wait_refused(rig, published)
        probes_a = rig.app_a.count("fresh")  # those that got through before the CRL was read
        for _ in range(3):  # and it stays refused, with OpenSSL's reason
            with pytest.raises(httpx.ConnectError, match=OPENSSL_REVOKED):
                rig.probe(rig.a)
        assert rig.probe(rig.b).text == "b"  # the other endpoint's handshake is unaffected

        before_a, before_b = rig.app_a.count(), rig.app_b.count()
        retried: list[Decision] = []
        calls = 0
        for _ in range(200):  # bounded: until enough calls and one retried off A
            response = _call(rig.web) if calls % 2 else asyncio.run(_acall(rig.web))
            calls += 1
            assert response.status_code == 200 and response.text == "b"
            decision = _decision(response)
            assert decision.mtls and decision.attempts[-1].outcome == "ok"
            if len(decision.attempts) > 1:
                retried.append(decision)
            if calls >= 20 and retried:
                break
        assert retried, "no call picked A first in 200 calls"
        first, last = retried[0].attempts[0], retried[0].attempts[-1]
        assert first.endpoint == f"127.0.0.1:{rig.a.port}"
        assert first.outcome == "connect_failure"  # the record keeps the type, not the text
        assert last.endpoint == f"127.0.0.1:{rig.b.port}"
        # nothing reached the revoked server; B served every call
        assert rig.app_a.count() == before_a
        assert rig.app_b.count() == before_b + calls

        # the connection opened before the revocation goes on (both ends keep it) ...
        assert rig.probe(rig.a, kept).text == "a"
        assert rig.app_a.count("kept") == 2 and len(rig.app_a.ports("kept")) == 1
    # ... and once it is closed, nothing reaches A any more
    with pytest.raises(httpx.ConnectError, match=OPENSSL_REVOKED):
        rig.probe(rig.a)
    assert rig.app_a.count("fresh") == probes_a and rig.app_a.count() == before_a
    status = rig.web.svid_status
    assert status is not None and status.last_error is None and status.reloads >= 1


def test_openssl_layer_refuses_the_revoked_server(rig: Rig) -> None:
    """Layer 1: the context the mesh's client transports take for a new connection carries the
    CRLs and VERIFY_CRL_CHECK_LEAF, so OpenSSL alone (no meshlib re-check here) fails the
    handshake with the revoked server, and still completes it with the other one."""
    svid = rig.web.svid
    assert svid is not None
    _wait(lambda: _call(rig.web).status_code == 200, "a first call")
    published = rig.revoke_a()
    _wait_refused(rig, published)
    ctx = svid.current_client_context()
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF

    def handshake(server: Any) -> None:
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            assert tls.getpeercert(True) is not None

    with pytest.raises(ssl.SSLCertVerificationError, match=OPENSSL_REVOKED):
        handshake(rig.a)
    handshake(rig.b)


def test_spiffe_recheck_refuses_a_revoked_server_that_openssl_let_through(rig: Rig) -> None:
    """Layer 2: a handshake made on a client context taken before the CRL arrived (a reload
    between taking the context and the handshake, which OpenSSL cannot see) completes; the
    mesh's SPIFFE re-check, reading the live CRLs, refuses the revoked server anyway, on the
    same connection, before any request byte."""
    svid = rig.web.svid
    assert svid is not None
    old = svid.current_client_context()  # holds the empty CRL only
    published = rig.revoke_a()
    _wait_refused(rig, published)  # the live CRLs (svid.crls) now revoke A

    verifier = PeerVerifier(lambda: rig.web.snapshot, svid)
    for server, revoked in ((rig.a, True), (rig.b, False)):
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as raw,
            old.wrap_socket(raw) as tls,  # OpenSSL accepts: the revocation is not in `old`
        ):
            if revoked:
                with pytest.raises(httpcore.ConnectError, match=SPIFFE_REVOKED) as info:
                    verifier.verify("127.0.0.1", server.port, tls)
                assert f"127.0.0.1:{server.port}" in str(info.value)
            else:
                verifier.verify("127.0.0.1", server.port, tls)
