"""Client-side mTLS with real handshakes on loopback: mesh calls present the workload's SVID
and check the server's SPIFFE ID (for the destination service) before any request byte."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from e2e.conftest import CallerFactory

import meshlib
from meshlib.config.loader import load_text
from meshlib.decision import DECISION_EXTENSION
from meshlib.identity import CertificateAuthority, SpiffeID

from .conftest import CLIENT_ID, PKI, TD, mesh_text, pem

pytestmark = pytest.mark.timeout(30)

REVIEWS_ID = SpiffeID.for_workload(TD, "default", "reviews")
RATINGS_ID = SpiffeID.for_workload(TD, "default", "ratings")


@pytest.fixture(params=["sync", "async"])
def caller(request: pytest.FixtureRequest) -> Iterator[CallerFactory]:
    factory = CallerFactory(request.param)
    yield factory
    factory.close()


@pytest.fixture
def client_mesh(pki: PKI) -> Iterator[Callable[..., meshlib.Mesh]]:
    """``client_mesh(ports, mtls="strict", svid=True, extra="")`` → the caller's mesh ("web")
    with a reviews service on those loopback ports."""
    from prometheus_client import CollectorRegistry

    made: list[meshlib.Mesh] = []

    def make(ports: list[int], mtls: str = "strict", svid: bool = True, extra: str = "") -> Any:
        endpoints = ", ".join(f'{{address: "127.0.0.1:{p}"}}' for p in ports)
        text = (
            mesh_text(mtls)
            + "---\napiVersion: meshlib/v1\nkind: Service\n"
            + "metadata: {name: reviews, namespace: default}\n"
            + f"spec: {{endpoints: [{endpoints}]}}\n"
            + extra
        )
        mesh = meshlib.Mesh.from_text(
            text,
            service="web",
            seed=7,
            registry=CollectorRegistry(),
            svid_dir=str(pki.client_dir) if svid else None,
        )
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()


def _svid(pki: PKI, sid: SpiffeID, ca: CertificateAuthority | None = None) -> Path:
    name = f"{sid.path.rsplit('/', 1)[-1]}-{id(ca)}"
    return (ca or pki.ca).issue(sid).save(pki.root / name)


def test_strict_call_presents_the_client_svid(
    pki: PKI, start: Any, client_mesh: Any, caller: CallerFactory
) -> None:
    server, app = start(_svid(pki, REVIEWS_ID))
    c = caller.bind(client_mesh([server.port]), timeout=5.0)
    response = c.get("http://reviews/ratings?x=1")
    assert response.status_code == 200
    assert response.text == str(CLIENT_ID)  # the server saw the client's verified identity
    assert len(app.scopes) == 1
    scope = app.scopes[0]
    assert scope["scheme"] == "https"
    assert scope["path"] == "/ratings"
    assert dict(scope["headers"])[b"host"] == b"reviews"  # Host stays the logical name
    assert response.extensions[DECISION_EXTENSION].attempts[0].outcome == "ok"


def test_wrong_server_identity_is_refused_before_any_request_byte(
    pki: PKI, start: Any, client_mesh: Any, caller: CallerFactory
) -> None:
    server, app = start(_svid(pki, RATINGS_ID))  # reviews served with the ratings SVID
    c = caller.bind(client_mesh([server.port]), timeout=5.0)
    error = c.outcome("POST", "http://reviews/order", content=b"pay")
    assert isinstance(error, httpx.ConnectError), error
    assert (
        f"server identity {RATINGS_ID} does not match expected {REVIEWS_ID} for reviews.default"
    ) in str(error)
    assert app.scopes == []  # the app never saw a request


def test_post_to_a_wrong_identity_is_retried_on_the_right_endpoint(
    pki: PKI, start: Any, client_mesh: Any, caller: CallerFactory
) -> None:
    wrong, wrong_app = start(_svid(pki, RATINGS_ID))
    right, right_app = start(_svid(pki, REVIEWS_ID))
    policy = (
        "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\n"
        "metadata: {name: rr, namespace: default}\n"
        "spec: {target: {service: reviews}, loadBalancer: {type: round-robin}}\n"
    )
    c = caller.bind(client_mesh([wrong.port, right.port], extra=policy), timeout=5.0)
    responses = [c.post("http://reviews/order", content=b"pay") for _ in range(4)]
    assert [r.status_code for r in responses] == [200] * 4
    assert wrong_app.scopes == []
    assert len(right_app.scopes) == 4
    retried = [
        r.extensions[DECISION_EXTENSION]
        for r in responses
        if r.extensions[DECISION_EXTENSION].retries
    ]
    assert retried, "round-robin never picked the wrong endpoint"
    first = retried[0].attempts[0]
    assert first.endpoint == f"127.0.0.1:{wrong.port}"
    assert first.outcome == "connect_failure"


def test_server_from_an_unknown_ca_is_refused(
    pki: PKI, start: Any, client_mesh: Any, caller: CallerFactory
) -> None:
    rogue = CertificateAuthority.create(TD)  # right trust domain and ID, wrong root
    server_dir = rogue.issue(REVIEWS_ID).save(pki.root / "rogue")
    # The server trusts both roots (so it accepts the client); the client trusts only its own.
    (server_dir / "bundle.pem").write_bytes(pem(rogue.certificate, pki.ca.certificate))
    server, app = start(server_dir)
    c = caller.bind(client_mesh([server.port]), timeout=5.0)
    error = c.outcome("GET", "http://reviews/")
    assert isinstance(error, httpx.ConnectError), error
    assert "certificate verify failed" in str(error)
    assert app.scopes == []


def test_disable_mode_calls_over_plain_http(
    pki: PKI, start: Any, client_mesh: Any, caller: CallerFactory
) -> None:
    server, app = start(None, mtls="disable")
    assert server.url.startswith("http://")
    c = caller.bind(client_mesh([server.port], mtls="disable"), timeout=5.0)
    response = c.get("http://reviews/")
    assert response.status_code == 200
    assert response.text == "-"  # no TLS, no identity
    assert app.scopes[0]["scheme"] == "http"


def test_strict_mesh_without_svid_dir_is_unchanged(
    start: Any, client_mesh: Any, caller: CallerFactory
) -> None:
    server, app = start(None, mtls="disable")
    c = caller.bind(client_mesh([server.port], svid=False), timeout=5.0)
    assert c.get("http://reviews/").status_code == 200
    assert app.scopes[0]["scheme"] == "http"


def test_passthrough_hosts_keep_the_plain_inner_transport(
    pki: PKI, start: Any, client_mesh: Any, caller: CallerFactory
) -> None:
    plain, app = start(None, mtls="disable")
    c = caller.bind(client_mesh([1]), timeout=5.0)  # strict mesh, reviews unused
    response = c.get(plain.url + "/")  # 127.0.0.1:port is not a mesh host
    assert response.status_code == 200
    assert app.scopes[0]["scheme"] == "http"


def test_ambiguous_endpoint_fails_closed(pki: PKI, caplog: pytest.LogCaptureFixture) -> None:
    from meshlib.outbound.mtls import expected_identities

    def svc(name: str, sa: str) -> str:
        return (
            "---\napiVersion: meshlib/v1\nkind: Service\n"
            f"metadata: {{name: {name}, namespace: default}}\n"
            f'spec: {{serviceAccount: {sa}, endpoints: [{{address: "127.0.0.1:9"}}]}}\n'
        )

    snapshot = load_text(
        mesh_text() + svc("a", "a") + svc("b", "b") + svc("c", "x") + svc("d", "x")
    )
    with caplog.at_level("ERROR", logger="meshlib.identity"):
        found = expected_identities(snapshot)
    sid, reason = found[("127.0.0.1", 9)]
    assert sid is None
    assert "a.default" in reason and "b.default" in reason
    assert "ambiguous" in caplog.text


def test_same_identity_under_two_services_is_accepted(pki: PKI) -> None:
    from meshlib.outbound.mtls import expected_identities

    def svc(name: str) -> str:
        return (
            "---\napiVersion: meshlib/v1\nkind: Service\n"
            f"metadata: {{name: {name}, namespace: default}}\n"
            f'spec: {{serviceAccount: shared, endpoints: [{{address: "127.0.0.1:9"}}]}}\n'
        )

    found = expected_identities(load_text(mesh_text() + svc("a") + svc("b")))
    assert found[("127.0.0.1", 9)][0] == SpiffeID.for_workload(TD, "default", "shared")


def test_httpx_private_pool_attribute_is_what_requests_go_through(
    pki: PKI, client_mesh: Any
) -> None:
    """The mTLS transports replace httpx's private ``_pool``: fail loudly if httpx changes."""
    from meshlib.outbound.mtls import AsyncMeshTLSTransport, MeshTLSTransport

    assert "self._pool.handle_request(" in inspect.getsource(httpx.HTTPTransport.handle_request)
    assert "self._pool.handle_async_request(" in inspect.getsource(
        httpx.AsyncHTTPTransport.handle_async_request
    )
    mesh = client_mesh([1])
    sync = mesh.mtls_transport()
    assert isinstance(sync, MeshTLSTransport)
    assert type(sync._pool) is httpcore.ConnectionPool
    sync.close()
    assert isinstance(mesh.async_mtls_transport(), AsyncMeshTLSTransport)


ROUND_ROBIN = (
    "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\n"
    "metadata: {name: reviews-policy, namespace: default}\n"
    "spec: {target: {service: reviews}, loadBalancer: {type: round-robin}}\n"
)


@pytest.mark.timeout(20)
def test_each_endpoint_has_its_own_mtls_pool_and_close_closes_them(
    pki: PKI, start: Any, client_mesh: Any, caller: CallerFactory
) -> None:
    """Two mTLS endpoints: an mTLS pool each (one connection each, one shared client context,
    the mesh's verifier), under the client's ``limits``; closing the transport closes both."""
    servers = [start(_svid(pki, REVIEWS_ID))[0] for _ in range(2)]
    ports = sorted(server.port for server in servers)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    c = caller.bind(client_mesh(ports, extra=ROUND_ROBIN), timeout=5.0, limits=limits)
    for _ in range(4):
        assert c.get("http://reviews/").status_code == 200
    transport: Any = c._client._transport
    pools = dict(transport._pools.items())
    assert sorted(pools) == [(True, f"127.0.0.1:{port}") for port in ports]
    inner = [t._pool for t in pools.values()]
    assert [len(pool.connections) for pool in inner] == [1, 1]
    assert [pool._max_connections for pool in inner] == [1, 1]  # limits apply per endpoint
    assert inner[0]._ssl_context is inner[1]._ssl_context  # one context, not one per pool
    opened = [pool.connections[0] for pool in inner]
    if c.mode == "sync":
        transport.close()
    else:
        c._run(transport.aclose())
    assert all(connection.is_closed() for connection in opened)
    assert transport._pools.items() == []
