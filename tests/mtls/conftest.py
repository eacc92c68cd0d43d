"""mTLS fixtures: a CA and SVID directories on disk, a recording app, TLS client contexts."""

from __future__ import annotations

import datetime as dt
import os
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import meshlib
from meshlib.identity import CertificateAuthority, SpiffeID

TD = "shop.test"
SERVER_ID = SpiffeID.for_workload(TD, "default", "productpage")
CLIENT_ID = SpiffeID.for_workload(TD, "default", "web")


def mesh_text(mtls: str = "strict", trust_domain: str = TD) -> str:
    return (
        "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: mesh}\n"
        f"spec: {{trustDomain: {trust_domain}, mtls: {mtls}}}\n"
    )


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_pair(
    directory: Path,
    chain: tuple[x509.Certificate, ...],
    key: ec.EllipticCurvePrivateKey,
    bundle: tuple[x509.Certificate, ...],
) -> Path:
    """Write cert/key/bundle files without any validation (for crafted, broken pairs). Each
    file is replaced whole (temporary file, then rename): a watcher polling the directory must
    see the crafted pair, never a half-written file (that is a different refusal)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in (
        ("cert.pem", pem(*chain)),
        ("key.pem", key_pem(key)),
        ("bundle.pem", pem(*bundle)),
    ):
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / name)
    return directory


def craft_leaf(
    ca: CertificateAuthority, uris: tuple[str, ...]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf signed by ``ca`` with the given URI SANs, otherwise SVID-shaped."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    ku = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlib")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(ku, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert, key


def client_context(
    server_ca: CertificateAuthority, cert_dir: Path | None = None, *, key_name: str = "key.pem"
) -> ssl.SSLContext:
    """A client context trusting ``server_ca`` and presenting ``cert_dir``'s pair (if any)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=pem(server_ca.certificate).decode())
    if cert_dir is not None:
        ctx.load_cert_chain(cert_dir / "cert.pem", cert_dir / key_name)
    return ctx


def https_client(ctx: ssl.SSLContext) -> httpx.Client:
    return httpx.Client(verify=ctx, timeout=5.0)


@dataclass
class Recorder:
    """An ASGI app answering the caller's verified identity (or "-") and recording scopes."""

    scopes: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.scopes.append(dict(scope))
        headers = dict(scope["headers"])
        body = headers.get(b"x-mesh-identity", b"-")
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


@dataclass
class PKI:
    ca: CertificateAuthority
    server_dir: Path
    client_dir: Path
    root: Path


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca = CertificateAuthority.create(TD)
    server_dir = ca.issue(SERVER_ID).save(tmp_path / "server")
    client_dir = ca.issue(CLIENT_ID).save(tmp_path / "client")
    return PKI(ca, server_dir, client_dir, tmp_path)


@pytest.fixture
def make_mesh() -> Iterator[Callable[..., meshlib.Mesh]]:
    from prometheus_client import CollectorRegistry

    made: list[meshlib.Mesh] = []

    def make(mtls: str = "strict") -> meshlib.Mesh:
        mesh = meshlib.Mesh.from_text(
            mesh_text(mtls), service="productpage", seed=7, registry=CollectorRegistry()
        )
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()


@pytest.fixture
def start(
    make_mesh: Callable[..., meshlib.Mesh],
) -> Iterator[Callable[..., tuple[Any, Recorder]]]:
    """``start(svid_dir, mtls="strict")`` → (running server, recorder behind MeshMiddleware)."""
    from meshlib.inbound.serving import serve

    servers: list[Any] = []

    def run(svid_dir: Path | None, mtls: str = "strict") -> tuple[Any, Recorder]:
        mesh = make_mesh(mtls)
        recorder = Recorder()
        app = meshlib.MeshMiddleware(recorder, mesh=mesh)
        server = serve(
            app,
            mesh=mesh,
            svid_dir=None if svid_dir is None else str(svid_dir),
            # These tests reload by hand (server.reload_svid()); the rotation watcher has its
            # own tests (test_rotation.py) and must not race them.
            svid_poll_interval=None,
            lifespan="off",
            timeout_keep_alive=5,
        )
        servers.append(server)
        return server, recorder

    yield run
    for server in servers:
        server.stop()
