"""meshlib SVIDs in a real TLS stack: strict OpenSSL accepts them in mutual TLS (SEC-8)."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509

from meshlib.identity import CertificateAuthority, SpiffeID, verify_svid

pytestmark = pytest.mark.timeout(30)

TD = "example.org"
SERVER = SpiffeID.for_workload(TD, "default", "reviews")
CLIENT = SpiffeID.for_workload(TD, "default", "web")


def _context(side: int, svid_dir: Path, trust: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # SPIFFE IDs are URIs, checked with verify_svid below
    ctx.verify_mode = ssl.CERT_REQUIRED
    if hasattr(ssl, "VERIFY_X509_STRICT"):
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_cert_chain(svid_dir / "cert.pem", svid_dir / "key.pem")
    ctx.load_verify_locations(cafile=str(trust))
    return ctx


def _issue(ca: CertificateAuthority, sid: SpiffeID, out: Path) -> Path:
    ca.issue(sid).save(out)  # real clock: OpenSSL checks validity against the wall clock
    return out


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[bytes | None, bytes | None, BaseException | None, BaseException | None]:
    """Run both ends over a socketpair; return (client's peer cert, server's peer cert, errors)."""
    s_sock, c_sock = socket.socketpair()
    s_sock.settimeout(10)
    c_sock.settimeout(10)
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(s_sock, server_side=True) as tls:
                result["peer"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as exc:
            result["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    client_peer: bytes | None = None
    client_error: BaseException | None = None
    try:
        with client_ctx.wrap_socket(c_sock) as tls:
            client_peer = tls.getpeercert(binary_form=True)
            # TLS 1.3 reports a rejected client certificate only on the next read.
            if tls.recv(2) != b"ok":
                raise ConnectionError("server closed without answering")
    except (OSError, ssl.SSLError) as exc:
        client_error = exc
    finally:
        c_sock.close()
        thread.join(timeout=10)
        s_sock.close()
    server_peer = result.get("peer")
    server_error = result.get("error")
    assert server_peer is None or isinstance(server_peer, bytes)
    assert server_error is None or isinstance(server_error, BaseException)
    return client_peer, server_peer, client_error, server_error


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pki")
    ca, rogue = CertificateAuthority.create(TD), CertificateAuthority.create(TD)
    return {
        "server": _issue(ca, SERVER, base / "server"),
        "client": _issue(ca, CLIENT, base / "client"),
        "rogue": _issue(rogue, CLIENT, base / "rogue"),
        "bundle": base / "server" / "bundle.pem",
    }


def test_mutual_tls_with_strict_verification_and_spiffe_ids(pki: dict[str, Path]) -> None:
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, pki["server"], pki["bundle"])
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, pki["client"], pki["bundle"])
    client_peer, server_peer, client_error, server_error = _handshake(server_ctx, client_ctx)
    assert client_error is None and server_error is None
    assert client_peer is not None and server_peer is not None
    roots = x509.load_pem_x509_certificates(pki["bundle"].read_bytes())
    seen_by_client = x509.load_der_x509_certificate(client_peer)
    seen_by_server = x509.load_der_x509_certificate(server_peer)
    assert verify_svid([seen_by_client], roots, trust_domain=TD, expected_id=SERVER) == SERVER
    assert verify_svid([seen_by_server], roots, trust_domain=TD, expected_id=CLIENT) == CLIENT


def test_server_from_an_unknown_ca_fails_the_client_handshake(pki: dict[str, Path]) -> None:
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, pki["rogue"], pki["rogue"] / "bundle.pem")
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, pki["client"], pki["bundle"])
    client_peer, _, client_error, _ = _handshake(server_ctx, client_ctx)
    assert client_peer is None
    assert isinstance(client_error, ssl.SSLCertVerificationError)
    assert "certificate verify failed" in str(client_error)


def test_client_from_an_unknown_ca_is_refused_by_the_server(pki: dict[str, Path]) -> None:
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, pki["server"], pki["bundle"])
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, pki["rogue"], pki["bundle"])
    _, server_peer, client_error, server_error = _handshake(server_ctx, client_ctx)
    assert server_peer is None
    assert isinstance(server_error, ssl.SSLError)
    assert "certificate verify failed" in str(server_error)
    assert client_error is not None  # the client learns of it too, never gets "ok"
