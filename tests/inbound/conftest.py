"""Inbound fixtures: meshes, SPIFFE client certificates and synthetic ASGI TLS scopes."""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import meshlib

SERVICE_ONLY = (
    "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: mesh}\nspec: {trustDomain: shop.test}\n"
)


@pytest.fixture
def make_mesh() -> Iterator[Callable[..., meshlib.Mesh]]:
    """``make_mesh(policy_text=SERVICE_ONLY, **Mesh kwargs)`` → a Mesh (service "productpage",
    trust domain ``shop.test`` by default) closed at teardown, with a private registry."""
    from prometheus_client import CollectorRegistry

    made: list[meshlib.Mesh] = []

    def make(text: str = SERVICE_ONLY, **kwargs: Any) -> meshlib.Mesh:
        kwargs.setdefault("service", "productpage")
        kwargs.setdefault("seed", 7)
        kwargs.setdefault("registry", CollectorRegistry())
        mesh = meshlib.Mesh.from_text(text, **kwargs)
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()


@functools.cache
def spiffe_cert(*uris: str) -> str:
    """A PEM client certificate whose URI SANs are ``uris`` (self-signed: the TLS server is
    what verifies chains; the middleware only reads the verified leaf)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlib-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
    )
    if uris:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def tls_extension(*uris: str, error: str | None = None) -> dict[str, Any]:
    """``scope["extensions"]`` as a TLS server would fill it for a client presenting a
    certificate with ``uris`` as URI SANs."""
    return {
        "tls": {
            "server_cert": None,
            "client_cert_chain": [spiffe_cert(*uris)],
            "client_cert_name": "O=meshlib-test",
            "client_cert_error": error,
            "tls_version": 0x0304,
            "cipher_suite": 0x1301,
        }
    }


def http_scope(
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    extensions: dict[str, Any] | None = None,
    path: str = "/",
    kind: str = "http",
    method: str = "GET",
) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": kind,
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": list(headers or []),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    if extensions is not None:
        scope["extensions"] = extensions
    return scope
