"""The gateway as the way in: TLS terminated per host name (two names, two certificates, chosen by
SNI on real handshakes), then re-encrypted into the mesh with the gateway's own SVID to a
strict-mTLS service that refuses the same external client when it calls directly (issue 14)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.identity import CertificateAuthority, SpiffeID
from meshlib.inbound.serving import Server, serve
from tests.gateway.fixtures import GATEWAY_HEAD, gateway_policy, running_gateway, tls_secret
from tests.gateway.gwcerts import TestCA
from tests.gateway.running import RunningGateway
from tests.mtls.conftest import TD, Recorder, mesh_text

pytestmark = pytest.mark.timeout(30)

GATEWAY_ID = SpiffeID.for_workload(TD, "edge", "gateway")
PRODUCTPAGE_ID = SpiffeID.for_workload(TD, "default", "productpage")
EDGE_CA = TestCA.create("edge CA")
SHOP = EDGE_CA.leaf("shop.example.com")
API = EDGE_CA.leaf("api.example.com")

GATEWAY = (
    GATEWAY_HEAD
    + """\
  - name: shop
    hostname: shop.example.com
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: shop-cert}]}
  - name: api
    hostname: api.example.com
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: api-cert}]}
  - {name: http, port: 80, protocol: HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: edge}
spec:
  parentRefs: [{name: edge, port: 443}]
  hostnames: [shop.example.com, api.example.com]
  rules:
  - backendRefs: [{name: productpage, namespace: default, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-https, namespace: edge}
spec:
  parentRefs: [{name: edge, sectionName: http}]
  rules:
  - filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, statusCode: 301}
"""
)


@pytest.fixture
def mesh_ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.fixture
def productpage(mesh_ca: CertificateAuthority, tmp_path: Path) -> Iterator[tuple[Server, Recorder]]:
    """A strict-mTLS service whose app answers the caller's verified identity."""
    svid = mesh_ca.issue(PRODUCTPAGE_ID).save(tmp_path / "productpage")
    mesh = meshlib.Mesh.from_text(
        mesh_text("strict"), service="productpage", seed=7, registry=CollectorRegistry()
    )
    recorder = Recorder()
    server = serve(
        meshlib.MeshMiddleware(recorder, mesh=mesh),
        mesh=mesh,
        svid_dir=str(svid),
        svid_poll_interval=None,
        lifespan="off",
    )
    try:
        yield server, recorder
    finally:
        server.stop()
        mesh.close()


@pytest.fixture
def gateway(
    mesh_ca: CertificateAuthority, tmp_path: Path, productpage: tuple[Server, Recorder]
) -> Iterator[RunningGateway]:
    svid = mesh_ca.issue(GATEWAY_ID).save(tmp_path / "gateway")
    with running_gateway(
        gateway_policy({"default/productpage": productpage[0].port}, mtls="strict"),
        "---\n".join([GATEWAY, tls_secret("shop-cert", SHOP), tls_secret("api-cert", API)]),
        mesh_options={"svid_dir": str(svid)},
        ports={443: 0, 80: 0},
    ) as running:
        yield running


def _outside_context() -> ssl.SSLContext:
    """An external client: trusts the edge CA, has no mesh identity."""
    return ssl.create_default_context(cadata=EDGE_CA.pem.decode())


def _served_name(port: int, server_name: str) -> str:
    """The CN of the certificate the gateway presents for ``server_name`` (a real handshake)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        _outside_context().wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_two_host_names_get_their_own_certificates_and_a_stranger_none(
    gateway: RunningGateway,
) -> None:
    port = gateway.port(443)
    assert _served_name(port, "shop.example.com") == "shop.example.com"
    assert _served_name(port, "api.example.com") == "api.example.com"
    # Refused in the handshake: no certificate is presented. (asyncio's TLS closes the
    # connection without flushing the unrecognized_name alert: the client may see an EOF.)
    with pytest.raises(ssl.SSLError, match=r"UNRECOGNIZED_NAME|UNEXPECTED_EOF"):
        _served_name(port, "evil.example.net")


def test_an_outside_client_reaches_a_strict_service_only_through_the_gateway(
    gateway: RunningGateway, productpage: tuple[Server, Recorder]
) -> None:
    server, recorder = productpage
    port = gateway.port(443)
    with httpx.Client(verify=_outside_context(), timeout=10.0) as client:
        for host in ("shop.example.com", "api.example.com"):
            response = client.get(
                f"https://127.0.0.1:{port}/products",
                headers={"host": host, "x-mesh-identity": "spiffe://shop.test/ns/x/sa/admin"},
                extensions={"sni_hostname": host},
            )
            assert response.status_code == 200, response.text
            # The service saw the gateway's verified SVID, not the forged header.
            assert response.text == str(GATEWAY_ID)
    assert len(recorder.scopes) == 2
    # The same client, calling the service directly, has no SVID to present: refused.
    with (
        httpx.Client(verify=False, timeout=5.0) as direct,
        pytest.raises(httpx.TransportError),
    ):
        direct.get(f"https://127.0.0.1:{server.port}/products")
    with (
        httpx.Client(timeout=5.0) as plain,
        pytest.raises(httpx.TransportError),
    ):
        plain.get(f"http://127.0.0.1:{server.port}/products")
    assert len(recorder.scopes) == 2


def test_plain_http_is_redirected_to_https(
    gateway: RunningGateway, productpage: tuple[Server, Recorder]
) -> None:
    response = httpx.get(
        f"http://127.0.0.1:{gateway.port(80)}/products?id=1",
        headers={"host": "shop.example.com"},
        timeout=5.0,
    )
    assert response.status_code == 301
    assert response.headers["location"] == "https://shop.example.com/products?id=1"
    assert productpage[1].scopes == []
