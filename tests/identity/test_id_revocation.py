"""Revocation (SEC-6) without sockets: CRLs from the CA directory, verify_svid against them,
SVIDSource loading crl.pem, and OpenSSL's own CRL checks in real handshakes over memory BIOs
(revoked leaf refused, unrevoked accepted, a missing CRL for one CA fails closed), for a revoked
client and a revoked server, and the client's SPIFFE re-check (PeerVerifier) of a server."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import httpcore
import pytest
from cryptography import x509
from idcerts import TD
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.cli import main
from meshlib.identity import CAError, CertificateAuthority, SpiffeID, SVIDError, verify_svid
from meshlib.identity.cadir import CADirectory
from meshlib.identity.crl import load_crls
from meshlib.identity.tls import SVIDSource, TLSConfigError
from meshlib.outbound.mtls import PeerVerifier

WEB = SpiffeID.for_workload(TD, "default", "web")
API = SpiffeID.for_workload(TD, "default", "api")
DB = SpiffeID.for_workload(TD, "default", "db")


@pytest.fixture
def cadir(tmp_path: Path) -> CADirectory:
    d = CADirectory(tmp_path / "ca")
    d.init(TD)
    return d


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> ssl.SSLObject:
    """A full TLS handshake between two contexts over memory BIOs; raises what either side
    raises (the server's verification of the client certificate included). The client end."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    done = {"server": False, "client": False}
    for _ in range(10):
        for name, side, out, peer in (
            ("client", client, c_out, s_in),
            ("server", server, s_out, c_in),
        ):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer.write(out.read())
        if all(done.values()):
            # TLS 1.3: the server checks the client's certificate on its Finished; make the
            # client read so a server alert reaches it too.
            try:
                client.read(1)
            except ssl.SSLWantReadError:
                return client
    raise AssertionError("handshake did not finish")


def test_revoke_writes_one_crl_per_root_signed_by_it(cadir: CADirectory, tmp_path: Path) -> None:
    """SEC-6: the CA's CRL names the revoked serial; every root has a CRL, even an empty one."""
    web = cadir.issue(WEB, out=tmp_path / "web")
    revoked = cadir.revoke([tmp_path / "web" / "cert.pem"])
    assert [serial for serial, _ in revoked] == [web.certificate.serial_number]
    (crl,) = load_crls(cadir.path / "crl.pem")
    assert crl.is_signature_valid(cadir.current().certificate.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(web.certificate.serial_number)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    # a rotation adds an (empty) CRL for the new root; re-signing moves lastUpdate forward
    cadir.rotate()
    old, new = load_crls(cadir.path / "crl.pem")[::-1]
    assert new.issuer == cadir.current().certificate.subject and len(list(new)) == 0
    assert old.get_revoked_certificate_by_serial_number(web.certificate.serial_number)
    assert old.last_update_utc > crl.last_update_utc
    assert old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number + 1
    stranger = CertificateAuthority.create(TD).issue(WEB).save(tmp_path / "stranger")
    with pytest.raises(CAError, match="was not issued by a root in"):
        cadir.revoke([stranger / "cert.pem"])


def test_verify_svid_rejects_a_revoked_serial_and_fails_closed(
    cadir: CADirectory, tmp_path: Path
) -> None:
    """SEC-6: verify_svid with CRLs: revoked → refused; no CRL from the issuer → refused;
    an expired CRL → refused; without CRLs, no revocation checking."""
    web = cadir.issue(WEB, out=tmp_path / "web")
    api = cadir.issue(API, ttl=dt.timedelta(days=40))
    roots = cadir.bundle().roots
    cadir.revoke([tmp_path / "web" / "cert.pem"])
    crls = load_crls(cadir.path / "crl.pem")
    with pytest.raises(SVIDError, match=r"leaf serial [0-9a-f]+ was revoked by CN=meshlib root"):
        verify_svid(web.chain, roots, crls=crls)
    assert verify_svid(api.chain, roots, crls=crls) == API
    assert verify_svid(web.chain, roots) == WEB  # no CRLs given: not checked
    with pytest.raises(SVIDError, match=r"no CRL from .* fails closed"):
        verify_svid(api.chain, roots, crls=())
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=31)
    with pytest.raises(SVIDError, match=r"CRL from .* is not current"):
        verify_svid(api.chain, roots, crls=crls, now=later.replace(microsecond=0))


def test_svid_source_loads_crl_pem_and_openssl_refuses_the_revoked_leaf(
    cadir: CADirectory, tmp_path: Path
) -> None:
    """SEC-6: crl.pem in the SVID dir turns on VERIFY_CRL_CHECK_LEAF; a reload picks up a new
    CRL in the live server context: the revoked client's handshake fails, others pass."""
    cadir.revoke([])  # an empty CRL: checking on from the start
    cadir.issue(API, out=tmp_path / "api")
    server = SVIDSource(tmp_path / "api")
    cadir.issue(WEB, out=tmp_path / "web")
    cadir.issue(DB, out=tmp_path / "db")
    assert server.crls is not None
    ctx = server.server_context()
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    web, db = SVIDSource(tmp_path / "web"), SVIDSource(tmp_path / "db")
    _handshake(ctx, web.client_context())

    cadir.revoke([tmp_path / "web" / "cert.pem"])
    (tmp_path / "api" / "crl.pem").write_bytes((cadir.path / "crl.pem").read_bytes())
    assert server.reload() is True
    with pytest.raises(ssl.SSLError, match="revoked"):
        _handshake(ctx, web.client_context())
    _handshake(ctx, db.client_context())  # unrevoked: unaffected
    _handshake(server.server_context(), db.client_context())  # fresh contexts too
    with pytest.raises(ssl.SSLError, match="revoked"):
        _handshake(server.server_context(), web.client_context())


def test_missing_crl_for_one_ca_fails_closed_in_openssl(cadir: CADirectory, tmp_path: Path) -> None:
    """SEC-6: CRL checking on, bundle {R1, R2}, a CRL from R1 only: an R2 leaf is refused by
    OpenSSL ("unable to get certificate CRL"); an R1 leaf passes."""
    cadir.revoke([])
    r1_crl = (cadir.path / "crl.pem").read_bytes()  # R1's CRL only
    cadir.issue(WEB, out=tmp_path / "r1-web")
    cadir.rotate()
    cadir.issue(API, out=tmp_path / "api")
    cadir.issue(WEB, out=tmp_path / "r2-web")
    (tmp_path / "crl-r1.pem").write_bytes(r1_crl)

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "api" / "cert.pem", tmp_path / "api" / "key.pem")
    server.load_verify_locations(cafile=tmp_path / "api" / "bundle.pem")
    server.load_verify_locations(cafile=tmp_path / "crl-r1.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    server.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT

    def client(d: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cafile=tmp_path / "api" / "bundle.pem")
        ctx.load_cert_chain(tmp_path / d / "cert.pem", tmp_path / d / "key.pem")
        return ctx

    _handshake(server, client("r1-web"))
    with pytest.raises(ssl.SSLError, match="unable to get certificate CRL"):
        _handshake(server, client("r2-web"))


def test_svid_source_refuses_crl_files_that_would_fail_every_peer_of_a_root(
    cadir: CADirectory, tmp_path: Path
) -> None:
    """SEC-6: a crl.pem without a CRL for one bundle root, or a removed crl.pem once checking
    is on, is refused with the reason; the last good state stays."""
    cadir.revoke([])
    r1_crl = (cadir.path / "crl.pem").read_bytes()
    out = tmp_path / "web"
    cadir.issue(WEB, out=out)
    source = SVIDSource(out)
    live = source.crls
    cadir.rotate()
    cadir.export_bundle(out / "bundle.pem")
    (out / "crl.pem").write_bytes(r1_crl)  # the bundle has R2 now, the CRL file does not
    with pytest.raises(TLSConfigError, match=r"has no CRL from CN=meshlib root CA [0-9a-f]+"):
        source.reload()
    assert source.crls == live and source.bundle_sequence == 1
    (out / "crl.pem").write_bytes((cadir.path / "crl.pem").read_bytes())
    assert source.reload() is True and len(source.crls or ()) == 2
    (out / "crl.pem").unlink()
    with pytest.raises(TLSConfigError, match="removing the file does not turn revocation off"):
        source.reload()
    (out / "crl.pem").write_bytes(b"garbage")
    with pytest.raises(CAError, match="holds no PEM CRL"):
        source.reload()
    assert len(source.crls or ()) == 2


def test_issue_copies_crl_pem_and_cli_revoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SEC-6: `meshctl ca revoke` writes DIR/crl.pem; `ca issue` copies it next to bundle.pem."""
    ca = str(tmp_path / "ca")
    assert main(["ca", "init", "--dir", ca, "--trust-domain", TD]) == 0
    issue = ["ca", "issue", "--dir", ca, "--namespace", "default", "--service-account", "web"]
    assert main([*issue, "--out", str(tmp_path / "web")]) == 0
    assert not (tmp_path / "web" / "crl.pem").exists()  # no CRL yet: checking stays off
    cert = str(tmp_path / "web" / "cert.pem")
    capsys.readouterr()
    assert main(["ca", "revoke", "--dir", ca, cert]) == 0
    out = capsys.readouterr().out
    assert "revoked serial" in out and "crl.pem: re-signed" in out
    assert main([*issue, "--out", str(tmp_path / "web2")]) == 0
    assert (tmp_path / "web2" / "crl.pem").read_bytes() == Path(ca, "crl.pem").read_bytes()
    assert main(["ca", "revoke", "--dir", ca, str(tmp_path / "nope.pem")]) == 1
    assert "meshctl ca revoke: cannot read" in capsys.readouterr().err


def test_crl_pem_appearing_later_turns_checking_on_in_live_contexts(
    cadir: CADirectory, tmp_path: Path
) -> None:
    """SEC-6: a workload started without crl.pem gets CRL checking at the reload that finds one,
    in the contexts it already handed out."""
    cadir.issue(API, out=tmp_path / "api")
    cadir.issue(WEB, out=tmp_path / "web")
    server = SVIDSource(tmp_path / "api")
    ctx = server.server_context()
    assert server.crls is None and not ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    web = SVIDSource(tmp_path / "web")
    _handshake(ctx, web.client_context())
    cadir.revoke([tmp_path / "web" / "cert.pem"])
    (tmp_path / "api" / "crl.pem").write_bytes((cadir.path / "crl.pem").read_bytes())
    assert server.reload() is True and server.crls is not None
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    with pytest.raises(ssl.SSLError, match="revoked"):
        _handshake(ctx, web.client_context())


def test_client_contexts_refuse_a_revoked_server(cadir: CADirectory, tmp_path: Path) -> None:
    """SEC-6, server side: a client's crl.pem revoking a *server* leaf makes OpenSSL fail the
    client's handshake with it, in the context handed out before the reload (the CRL is added)
    and in the per-connection context the mesh transports take (rebuilt at the reload); another
    server of the same identity is unaffected."""
    cadir.revoke([])
    cadir.issue(WEB, out=tmp_path / "web")
    cadir.issue(API, out=tmp_path / "api-a")
    cadir.issue(API, out=tmp_path / "api-b")
    client = SVIDSource(tmp_path / "web")
    handed_out, fresh_before = client.client_context(), client.current_client_context()
    a, b = SVIDSource(tmp_path / "api-a"), SVIDSource(tmp_path / "api-b")
    _handshake(a.server_context(), fresh_before)

    cadir.revoke([tmp_path / "api-a" / "cert.pem"])
    (tmp_path / "web" / "crl.pem").write_bytes((cadir.path / "crl.pem").read_bytes())
    assert client.reload() is True
    fresh = client.current_client_context()
    assert fresh is not fresh_before  # replaced whole, never modified
    for ctx in (handed_out, fresh):
        assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate revoked"):
            _handshake(a.server_context(), ctx)
        _handshake(b.server_context(), ctx)
    # the context taken before the reload does not know: the SPIFFE re-check is what catches
    # a connection made on it (below and tests/mtls/test_server_revocation.py)
    _handshake(a.server_context(), fresh_before)


def test_peer_verifier_checks_the_server_leaf_against_the_live_crls(
    cadir: CADirectory, tmp_path: Path
) -> None:
    """SEC-6: the client's SPIFFE re-check of a server (PeerVerifier.verify, run after every
    client handshake) refuses a revoked server leaf even when OpenSSL accepted it, naming the
    endpoint and the serial; an unrevoked server of the same identity passes."""
    cadir.revoke([])
    cadir.issue(WEB, out=tmp_path / "web")
    cadir.issue(API, out=tmp_path / "api-a")
    cadir.issue(API, out=tmp_path / "api-b")
    client = SVIDSource(tmp_path / "web")
    no_crl = client.current_client_context()  # taken before the revocation arrives
    cadir.revoke([tmp_path / "api-a" / "cert.pem"])
    (tmp_path / "web" / "crl.pem").write_bytes((cadir.path / "crl.pem").read_bytes())
    assert client.reload() is True
    mesh = meshlib.Mesh.from_text(
        f"apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {{name: mesh}}\n"
        f"spec: {{trustDomain: {TD}}}\n---\n"
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: api, namespace: default}\n"
        'spec: {endpoints: [{address: "10.0.0.1:8443"}, {address: "10.0.0.2:8443"}]}\n',
        service="web",
        registry=CollectorRegistry(),
    )
    try:
        verifier = PeerVerifier(lambda: mesh.snapshot, client)
        a = SVIDSource(tmp_path / "api-a")
        b = SVIDSource(tmp_path / "api-b")
        revoked = _handshake(a.server_context(), no_crl)  # OpenSSL did not object
        serial = f"{a.material.certificate.serial_number:x}"
        with pytest.raises(
            httpcore.ConnectError,
            match=rf"server 10\.0\.0\.1:8443 .* leaf serial {serial} was revoked",
        ):
            verifier.verify("10.0.0.1", 8443, revoked)
        verifier.verify("10.0.0.2", 8443, _handshake(b.server_context(), no_crl))
    finally:
        mesh.close()
