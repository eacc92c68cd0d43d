"""Server-side mTLS with real handshakes on loopback (SEC-1, SEC-3, SEC-4, SEC-9)."""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshlib.identity import CertificateAuthority, IdentityError, SpiffeID, spiffe_id_of

from .conftest import (
    CLIENT_ID,
    PKI,
    SERVER_ID,
    TD,
    client_context,
    craft_leaf,
    https_client,
    pem,
    write_pair,
)

pytestmark = pytest.mark.timeout(30)


def _refused(server: Any, ctx: Any) -> BaseException:
    with https_client(ctx) as client, pytest.raises(httpx.TransportError) as info:
        client.get(server.url + "/")
    return info.value


def _server_cert(response: httpx.Response) -> x509.Certificate:
    ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
    return x509.load_der_x509_certificate(ssl_object.getpeercert(True))


def test_strict_valid_client_is_served_with_its_identity(pki: PKI, start: Any) -> None:
    server, app = start(pki.server_dir)
    assert server.url.startswith("https://")
    with https_client(client_context(pki.ca, pki.client_dir)) as client:
        response = client.get(server.url + "/x", headers={"x-mesh-identity": "spiffe://evil/x"})
        presented = _server_cert(response)
    assert response.status_code == 200
    assert response.text == str(CLIENT_ID)  # re-derived from the certificate, not the header
    tls = app.scopes[0]["extensions"]["tls"]
    assert tls["client_cert_error"] is None
    assert tls["tls_version"] in (0x0303, 0x0304)
    assert isinstance(tls["cipher_suite"], int)
    leaf = x509.load_pem_x509_certificate(tls["client_cert_chain"][0].encode())
    assert leaf == x509.load_pem_x509_certificate((pki.client_dir / "cert.pem").read_bytes())
    assert x509.load_pem_x509_certificate(tls["server_cert"].encode()) == presented
    assert spiffe_id_of(presented) == SERVER_ID


def test_strict_refuses_a_client_without_certificate(pki: PKI, start: Any) -> None:
    server, app = start(pki.server_dir)
    _refused(server, client_context(pki.ca))
    assert app.scopes == []


def test_strict_refuses_unknown_ca(pki: PKI, start: Any) -> None:
    server, app = start(pki.server_dir)
    rogue = CertificateAuthority.create(TD)  # same trust domain, different root
    rogue.issue(CLIENT_ID).save(pki.root / "rogue")
    _refused(server, client_context(pki.ca, pki.root / "rogue"))
    assert app.scopes == []


@pytest.mark.parametrize("shift", [dt.timedelta(days=-2), dt.timedelta(days=2)])
def test_strict_refuses_expired_and_not_yet_valid(
    pki: PKI, start: Any, shift: dt.timedelta
) -> None:
    server, app = start(pki.server_dir)
    then = dt.datetime.now(dt.timezone.utc) + shift
    pki.ca.issue(CLIENT_ID, ttl=dt.timedelta(hours=1), clock=lambda: then).save(pki.root / "t")
    _refused(server, client_context(pki.ca, pki.root / "t"))
    assert app.scopes == []


def test_other_trust_domain_in_bundle_is_refused_by_the_spiffe_check(
    pki: PKI, start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    other = CertificateAuthority.create("partner.test")
    # The server trusts both roots (a bundle may hold several), so OpenSSL accepts the chain.
    (pki.server_dir / "bundle.pem").write_bytes(pem(pki.ca.certificate, other.certificate))
    server, app = start(pki.server_dir)
    other.issue(SpiffeID.for_workload("partner.test", "default", "web")).save(pki.root / "o")
    with caplog.at_level(logging.WARNING, logger="meshlib.serving"):
        _refused(server, client_context(pki.ca, pki.root / "o"))
    assert app.scopes == []
    assert "trust domain 'partner.test'" in caplog.text
    # ...while a client of the mesh's own trust domain still gets in.
    with https_client(client_context(pki.ca, pki.client_dir)) as client:
        assert client.get(server.url + "/").text == str(CLIENT_ID)


def test_ca_certificate_presented_as_leaf_is_refused(pki: PKI, start: Any) -> None:
    server, app = start(pki.server_dir)
    write_pair(pki.root / "ca-leaf", (pki.ca.certificate,), pki.ca.key, pki.ca.bundle)
    _refused(server, client_context(pki.ca, pki.root / "ca-leaf"))
    # OpenSSL (X509_STRICT) already refuses a self-signed CA as a client leaf; were it to let
    # one through, the SPIFFE re-check refuses it too ("leaf is a CA certificate").
    assert app.scopes == []


def test_two_uri_sans_are_refused(pki: PKI, start: Any, caplog: pytest.LogCaptureFixture) -> None:
    server, app = start(pki.server_dir)
    cert, key = craft_leaf(pki.ca, (str(CLIENT_ID), f"spiffe://{TD}/ns/default/sa/admin"))
    write_pair(pki.root / "two", (cert,), key, pki.ca.bundle)
    with caplog.at_level(logging.WARNING, logger="meshlib.serving"):
        _refused(server, client_context(pki.ca, pki.root / "two"))
    assert app.scopes == []
    assert "2 URI SANs" in caplog.text


def test_permissive_serves_clients_without_certificate_as_unauthenticated(
    pki: PKI, start: Any
) -> None:
    server, app = start(pki.server_dir, "permissive")
    with https_client(client_context(pki.ca)) as client:
        anonymous = client.get(server.url + "/", headers={"x-mesh-identity": str(CLIENT_ID)})
    assert anonymous.status_code == 200
    assert anonymous.text == "-"  # the forged identity header never reached the app
    assert app.scopes[0]["extensions"]["tls"]["client_cert_chain"] == []
    with https_client(client_context(pki.ca, pki.client_dir)) as client:
        assert client.get(server.url + "/").text == str(CLIENT_ID)


def test_permissive_still_refuses_a_bad_certificate(pki: PKI, start: Any) -> None:
    server, app = start(pki.server_dir, "permissive")
    cert, key = craft_leaf(pki.ca, (str(CLIENT_ID), f"spiffe://{TD}/ns/default/sa/admin"))
    write_pair(pki.root / "two", (cert,), key, pki.ca.bundle)
    _refused(server, client_context(pki.ca, pki.root / "two"))
    assert app.scopes == []


def test_disable_serves_plain_http(pki: PKI, start: Any) -> None:
    server, app = start(None, "disable")
    assert server.url.startswith("http://")
    response = httpx.get(server.url + "/", headers={"x-mesh-identity": str(CLIENT_ID)})
    assert response.text == "-"
    assert "tls" not in (app.scopes[0].get("extensions") or {})


def test_tls_mode_without_svid_dir_is_refused(make_mesh: Any) -> None:
    from meshlib.inbound.serving import serve

    with pytest.raises(ValueError, match="svid_dir"):
        serve(lambda *a: None, mesh=make_mesh("strict"))  # type: ignore[arg-type]


def test_tls_mode_refuses_another_http_protocol(make_mesh: Any) -> None:
    """Under TLS the protocol class is meshlib's (identity, framing checks): an ``http=`` given
    to uvicorn would have been dropped silently; it is refused instead."""
    from meshlib.inbound.serving import serve

    with pytest.raises(ValueError, match="http= cannot be given"):
        serve(lambda *a: None, mesh=make_mesh("strict"), http="h11")  # type: ignore[arg-type]


def test_reload_swaps_pair_for_new_connections_old_ones_keep_working(pki: PKI, start: Any) -> None:
    server, _ = start(pki.server_dir)
    ctx = client_context(pki.ca, pki.client_dir)
    with https_client(ctx) as old_client:
        first = old_client.get(server.url + "/")
        old_cert = _server_cert(first)
        pki.ca.issue(SERVER_ID).save(pki.server_dir)
        assert server.reload_svid() is True
        assert server.reload_svid() is False  # same files: nothing to do
        again = old_client.get(server.url + "/")  # same keep-alive connection
        assert again.status_code == 200 and _server_cert(again) == old_cert
    with https_client(ctx) as new_client:
        fresh = new_client.get(server.url + "/")
        fresh_cert = _server_cert(fresh)
    assert fresh.status_code == 200
    assert fresh_cert != old_cert
    assert fresh_cert == server.svid.material.certificate


def test_reload_with_mismatched_key_keeps_serving_the_old_pair(pki: PKI, start: Any) -> None:
    server, _ = start(pki.server_dir)
    ctx = client_context(pki.ca, pki.client_dir)
    with https_client(ctx) as client:
        before = _server_cert(client.get(server.url + "/"))
    failures: list[Exception] = []
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:  # a new connection each time: every one is a fresh handshake
                with https_client(ctx) as c:
                    statuses.append(c.get(server.url + "/").status_code)
            except Exception as exc:  # recorded, asserted below
                failures.append(exc)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        new = pki.ca.issue(SERVER_ID)
        key_before = (pki.server_dir / "key.pem").read_bytes()
        new.save(pki.server_dir)
        (pki.server_dir / "key.pem").write_bytes(key_before)  # cert and key now disagree
        with pytest.raises(IdentityError, match="does not match"):
            server.reload_svid()
        assert server.svid.last_error is not None and "does not match" in server.svid.last_error
        n = len(statuses)
        while len(statuses) < n + 5 and not failures:
            with https_client(ctx) as c:  # also drives progress without sleeping
                statuses.append(c.get(server.url + "/").status_code)
    finally:
        stop.set()
        thread.join(10)
    assert failures == []
    assert statuses and set(statuses) == {200}
    with https_client(ctx) as client:
        assert _server_cert(client.get(server.url + "/")) == before


def test_reload_refuses_an_identity_change(pki: PKI, start: Any) -> None:
    server, _ = start(pki.server_dir)
    pki.ca.issue(CLIENT_ID).save(pki.server_dir)
    with pytest.raises(IdentityError, match="identity change"):
        server.reload_svid()
    assert server.svid.spiffe_id == SERVER_ID


def test_svid_source_refuses_bad_files_at_start(pki: PKI, tmp_path: Path) -> None:
    from meshlib.identity.tls import SVIDSource

    other = CertificateAuthority.create(TD)
    pki.ca.issue(SERVER_ID).save(tmp_path / "s")
    (tmp_path / "s" / "bundle.pem").write_bytes(pem(other.certificate))
    with pytest.raises(IdentityError, match="unknown CA"):
        SVIDSource(tmp_path / "s")
    with pytest.raises(IdentityError, match="trust domain"):
        SVIDSource(pki.server_dir, trust_domain="elsewhere.test")


class _FakeSSLObject:
    """What tls_extension reads from an ``ssl.SSLObject``, for cases OpenSSL stops first."""

    def __init__(self, leaf: x509.Certificate | None) -> None:
        self.leaf = leaf
        self.context = ssl.create_default_context()

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        return None if self.leaf is None else self.leaf.public_bytes(Encoding.DER)

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)

    def version(self) -> str:
        return "TLSv1.3"


def test_spiffe_recheck_refuses_a_ca_leaf_and_a_missing_cert(pki: PKI) -> None:
    from meshlib.identity.tls import SVIDSource
    from meshlib.inbound.serving import PeerRefused, tls_extension

    source = SVIDSource(pki.server_dir)
    fake: Any = _FakeSSLObject(pki.ca.certificate)
    with pytest.raises(PeerRefused, match="leaf is a CA certificate"):
        tls_extension(fake, source, trust_domain=TD, require_client_cert=True)
    with pytest.raises(PeerRefused, match="no client certificate"):
        tls_extension(_FakeSSLObject(None), source, trust_domain=TD, require_client_cert=True)  # type: ignore[arg-type]
    tls = tls_extension(_FakeSSLObject(None), source, trust_domain=TD, require_client_cert=False)  # type: ignore[arg-type]
    assert tls["client_cert_chain"] == [] and tls["tls_version"] == 0x0304
    assert tls["cipher_suite"] == 0x1302


def test_svid_source_client_context_talks_to_serve(pki: PKI, start: Any) -> None:
    from meshlib.identity.tls import SVIDSource

    server, _ = start(pki.server_dir)
    client_svid = SVIDSource(pki.client_dir)
    with https_client(client_svid.client_context()) as client:
        assert client.get(server.url + "/").text == str(CLIENT_ID)
