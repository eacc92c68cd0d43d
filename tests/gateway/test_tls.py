"""The gateway's server-side TLS: the certificate chosen by SNI (exact, wildcard, default or
refused) and client certificates for partners, each proven with a real TLS handshake over a
127.0.0.1 socket; the choice itself also as a pure function (issue 14)."""

from __future__ import annotations

import shutil
import socket
import ssl
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from meshlib.config.gatewaykind import load_gateway_config
from meshlib.gateway.tls import (
    GatewayTLSError,
    ServedCertificate,
    SniContext,
    hostname_matches,
    listener_contexts,
    select_certificate,
)
from tests.gateway.fixtures import GATEWAY_HEAD
from tests.gateway.gwcerts import Pair, TestCA

CA = TestCA.create()
SHOP = CA.leaf("shop.example.com")
WILD = CA.leaf("*.example.com")
DEEP = CA.leaf("*.api.example.com")
FALLBACK = CA.leaf("fallback.internal")
PARTNERS = TestCA.create("partners CA")
STRANGERS = TestCA.create("strangers CA")


def served(hostname: str | None, pair: Pair, listener: str = "") -> ServedCertificate:
    return ServedCertificate(hostname, pair.cert_pem, pair.key_pem, listener or str(hostname))


@dataclass
class Outcome:
    """Both ends of one handshake: the certificate the client was served (its CN) or the
    client's error, and the client certificate the server verified (its CN) or its error."""

    served: str | None = None
    client_error: str | None = None
    client_seen: str | None = None
    server_error: str | None = None


def _files(pair: Pair) -> tuple[Path, Path]:
    """The pair as files (ssl loads certificates from files only), kept for the session."""
    directory = Path(tempfile.mkdtemp(prefix="gw-tls-test-"))
    _TEMP_DIRS.append(directory)
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    return cert, key


_TEMP_DIRS: list[Path] = []


@pytest.fixture(autouse=True, scope="module")
def _remove_temp_dirs() -> Iterator[None]:
    yield
    for directory in _TEMP_DIRS:
        shutil.rmtree(directory, ignore_errors=True)


def _cn(der: bytes | None) -> str | None:
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def handshake(
    server: SniContext | ssl.SSLContext,
    server_hostname: str | None,
    *,
    client: Pair | None = None,
    check_hostname: bool = True,
    legacy: bool = False,
) -> Outcome:
    """One real handshake on 127.0.0.1: the server thread wraps the accepted socket with
    ``server.context``, answers b"ok" and closes; the client verifies against the test CA."""
    outcome = Outcome()
    server_ctx = server.context if isinstance(server, SniContext) else server
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:  # the client never came
            outcome.server_error = str(exc)
            return
        conn.settimeout(5)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                outcome.client_seen = _cn(tls.getpeercert(binary_form=True))
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            outcome.server_error = str(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=CA.pem.decode())
    ctx.check_hostname = check_hostname
    if legacy:  # a client that offers only TLS 1.0 and 1.1 (and may use old ciphers)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    if client is not None:
        ctx.load_cert_chain(*_files(client))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            outcome.served = _cn(tls.getpeercert(binary_form=True))
            # TLS 1.3: the server judges the client certificate after the client's side of
            # the handshake is done; its verdict arrives with the first read.
            if tls.recv(2) != b"ok":
                outcome.client_error = "closed without an answer"
    except (ssl.SSLError, OSError) as exc:
        outcome.client_error = str(exc)
    finally:
        thread.join(5)
        listener.close()
    assert not thread.is_alive()
    return outcome


def sni(*certificates: ServedCertificate, ca: bytes | None = None) -> SniContext:
    return SniContext(certificates, ca)


# --- the choice, pure ---------------------------------------------------------------------------


def test_hostname_matching_follows_the_listener_rule() -> None:
    assert hostname_matches("shop.example.com", "shop.example.com")
    assert hostname_matches("*.example.com", "a.example.com")
    assert hostname_matches("*.example.com", "a.b.example.com")  # upstream: a suffix match
    assert not hostname_matches("*.example.com", "example.com")
    assert not hostname_matches("*.example.com", "badexample.com")
    assert not hostname_matches("shop.example.com", "Shop.example.com.evil")


def test_selection_exact_then_most_specific_wildcard_then_default() -> None:
    certs = [
        served("*.example.com", WILD),
        served("shop.example.com", SHOP),
        served(None, FALLBACK),
        served("*.api.example.com", DEEP),
    ]
    assert select_certificate(certs, "shop.example.com") == 1
    assert select_certificate(certs, "SHOP.example.com.") == 1  # case and root dot ignored
    assert select_certificate(certs, "cart.example.com") == 0
    assert select_certificate(certs, "v1.api.example.com") == 3  # the longer suffix wins
    assert select_certificate(certs, "example.org") == 2
    assert select_certificate(certs, None) == 2
    assert select_certificate(certs[:2], "example.org") is None
    assert select_certificate(certs[:2], None) is None


def test_within_a_listener_the_certificate_covering_the_name_is_served() -> None:
    certs = [served(None, FALLBACK, "any"), served(None, SHOP, "any")]
    assert select_certificate(certs, "shop.example.com") == 1
    assert select_certificate(certs, "other.example.com") == 0


# --- real handshakes ----------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_each_name_gets_its_own_certificate() -> None:
    server = sni(served("*.example.com", WILD), served("shop.example.com", SHOP))
    shop = handshake(server, "shop.example.com")
    assert (shop.served, shop.client_error, shop.server_error) == ("shop.example.com", None, None)
    cart = handshake(server, "cart.example.com")
    assert (cart.served, cart.client_error) == ("*.example.com", None)


@pytest.mark.timeout(20)
def test_an_unknown_name_is_refused_without_a_default() -> None:
    server = sni(served("shop.example.com", SHOP))
    refused = handshake(server, "unknown.example.org", check_hostname=False)
    assert refused.served is None
    assert refused.client_error is not None and "UNRECOGNIZED_NAME" in refused.client_error
    no_sni = handshake(server, None, check_hostname=False)
    assert no_sni.served is None and "UNRECOGNIZED_NAME" in (no_sni.client_error or "")


@pytest.mark.timeout(20)
def test_an_unknown_name_is_served_the_default_when_there_is_one() -> None:
    server = sni(served("shop.example.com", SHOP), served(None, FALLBACK))
    # the client still verifies the chain; the name check is the client's own business
    default = handshake(server, "unknown.example.org", check_hostname=False)
    assert (default.served, default.client_error) == ("fallback.internal", None)
    strict = handshake(server, "unknown.example.org")
    assert strict.client_error is not None and "match" in strict.client_error
    assert handshake(server, "shop.example.com").served == "shop.example.com"


@pytest.mark.timeout(20)
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_below_1_2_is_refused() -> None:
    server = sni(served("shop.example.com", SHOP))
    old = handshake(server, "shop.example.com", legacy=True)
    assert old.served is None
    assert old.server_error is not None and "UNSUPPORTED_PROTOCOL" in old.server_error
    # control: the same client completes TLS 1.1 with a server whose floor is lower, so the
    # refusal above is the gateway's minimum, not this machine's OpenSSL policy
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lax.minimum_version = ssl.TLSVersion.TLSv1
    lax.set_ciphers("DEFAULT:@SECLEVEL=0")
    lax.load_cert_chain(*_files(SHOP))
    assert handshake(lax, "shop.example.com", legacy=True).served == "shop.example.com"
    assert handshake(server, "shop.example.com").served == "shop.example.com"


@pytest.mark.timeout(30)
def test_client_certificates_required_accepted_and_refused() -> None:
    server = sni(served("shop.example.com", SHOP), served("*.example.com", WILD), ca=PARTNERS.pem)
    partner = PARTNERS.leaf(common_name="acme", client=True)
    accepted = handshake(server, "shop.example.com", client=partner)
    assert (accepted.client_error, accepted.server_error) == (None, None)
    assert accepted.client_seen == "acme"
    # the same verification whichever certificate the SNI callback switched to
    wild = handshake(server, "cart.example.com", client=partner)
    assert (wild.served, wild.client_seen, wild.client_error) == ("*.example.com", "acme", None)
    missing = handshake(server, "shop.example.com")
    assert missing.server_error is not None and missing.client_seen is None
    assert missing.client_error is not None
    stranger = handshake(
        server, "shop.example.com", client=STRANGERS.leaf(common_name="eve", client=True)
    )
    assert (
        stranger.server_error is not None and "certificate verify failed" in stranger.server_error
    )
    assert stranger.client_error is not None and stranger.client_seen is None
    # without client validation, a client certificate is neither asked for nor needed
    plain = handshake(sni(served("shop.example.com", SHOP)), "shop.example.com")
    assert (plain.client_error, plain.client_seen) == (None, None)


GATEWAY = (
    GATEWAY_HEAD
    + """\
  - {name: http, port: 8080, protocol: HTTP}
  - name: shop
    hostname: shop.example.com
    port: 8443
    protocol: HTTPS
    tls: {certificateRefs: [{name: shop}]}
  - name: wild
    hostname: "*.example.com"
    port: 8443
    protocol: HTTPS
    tls: {certificateRefs: [{name: wild}]}
  - name: partners
    port: 9443
    protocol: HTTPS
    tls: {certificateRefs: [{name: shop}]}
  tls:
    frontend:
      default: {}
      perPort:
      - port: 9443
        tls:
          validation:
            caCertificateRefs: [{group: "", kind: ConfigMap, name: partners}]
"""
)


def _secret(name: str, pair: Pair) -> str:
    # PEM in stringData here (fixtures.tls_secret writes base64 data): both forms are read.
    return (
        f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: edge}}\n"
        "type: kubernetes.io/tls\nstringData:\n  tls.crt: |\n"
        + textwrap.indent(pair.cert_pem.decode(), "    ")
        + "  tls.key: |\n"
        + textwrap.indent(pair.key_pem.decode(), "    ")
    )


@pytest.mark.timeout(30)
def test_contexts_per_port_from_a_gateway_config_file() -> None:
    text = "---\n".join(
        [
            GATEWAY,
            _secret("shop", SHOP),
            _secret("wild", WILD),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: partners, namespace: edge}\n"
            "data:\n  ca.crt: |\n" + textwrap.indent(PARTNERS.pem.decode(), "    "),
        ]
    )
    config = load_gateway_config([("gw.yaml", text)])
    contexts = listener_contexts(config.gateways[0], config)
    assert sorted(contexts) == [8443, 9443]  # HTTP listeners have none
    assert handshake(contexts[8443], "cart.example.com").served == "*.example.com"
    assert handshake(contexts[8443], "shop.example.com").client_seen is None
    partner = PARTNERS.leaf(common_name="acme", client=True)
    # 9443's only listener has no hostname: it is the port's default
    ok = handshake(contexts[9443], "shop.example.com", client=partner)
    assert (ok.served, ok.client_seen, ok.client_error) == ("shop.example.com", "acme", None)
    assert handshake(contexts[9443], "shop.example.com").server_error is not None


def test_bad_material_is_a_clear_error() -> None:
    with pytest.raises(GatewayTLSError, match="at least one certificate"):
        SniContext([])
    mixed = ServedCertificate("shop.example.com", SHOP.cert_pem, WILD.key_pem, "shop")
    with pytest.raises(GatewayTLSError, match="listener 'shop'"):
        SniContext([mixed])
    with pytest.raises(GatewayTLSError, match="client CA bundle"):
        SniContext([served("shop.example.com", SHOP)], b"-----BEGIN CERTIFICATE-----\nxx\n")
