"""mTLS modes per namespace and per service (TrafficPolicy ``mtls.mode``), with real handshakes:
scope merge and validation, the client choosing TLS per destination, a server following its
service's mode, and strict → permissive → strict under load (SEC-3)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.cli import main as meshctl
from meshlib.config.loader import load_text
from meshlib.config.model import MTLSMode
from meshlib.errors import ConfigError
from meshlib.identity import SpiffeID
from meshlib.inbound.serving import serve
from meshlib.policy.routing import Router

from .conftest import CLIENT_ID, PKI, SERVER_ID, TD, Recorder, client_context, https_client

pytestmark = pytest.mark.timeout(30)

DETAILS_ID = SpiffeID.for_workload(TD, "default", "details")
LEGACY_ID = SpiffeID.for_workload(TD, "legacy", "old")


def _policy(ns_mode: str = "strict", svc_mode: str = "permissive", ports: str = "") -> str:
    """Mesh-wide disable; namespace default ``ns_mode``; productpage ``svc_mode``."""
    return f"""\
apiVersion: meshlib/v1
kind: Mesh
metadata: {{name: mesh}}
spec: {{trustDomain: {TD}, mtls: disable}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: productpage}}
spec: {{endpoints: [{{address: "127.0.0.1:{ports or 1}"}}]}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: details}}
spec: {{endpoints: [{{address: "127.0.0.1:2"}}]}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: old, namespace: legacy}}
spec: {{endpoints: [{{address: "127.0.0.1:3"}}]}}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: ns-mtls, namespace: default}}
spec: {{target: {{namespace: default}}, mtls: {{mode: {ns_mode}}}}}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: pp-mtls, namespace: default}}
spec: {{target: {{service: productpage}}, mtls: {{mode: {svc_mode}}}}}
"""


# --- configuration -------------------------------------------------------------------------


def test_service_beats_namespace_beats_mesh_with_sources() -> None:
    router = Router(load_text(_policy()))
    pp, details, old = (
        router.policy(k, None) for k in ("productpage.default", "details.default", "old.legacy")
    )
    assert (pp.mtls, pp.sources["mtls"]) == (MTLSMode.PERMISSIVE, "service:default/pp-mtls")
    assert (details.mtls, details.sources["mtls"]) == (MTLSMode.STRICT, "namespace:default/ns-mtls")
    assert old.mtls is MTLSMode.DISABLE and "mtls" not in old.sources
    strict_mesh = Router(load_text(_policy().replace("mtls: disable", "mtls: strict")))
    old = strict_mesh.policy("old.legacy", None)
    assert (old.mtls, old.sources["mtls"]) == (MTLSMode.STRICT, "mesh:Mesh.spec.mtls")


def test_explain_shows_the_mode_and_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(_policy())
    assert meshctl(["explain", str(path), "--service", "productpage", "--path", "/"]) == 0
    out = capsys.readouterr().out.splitlines()
    line = next(row for row in out if row.strip().startswith("mtls.mode "))
    assert line.split() == ["mtls.mode", "permissive", "service:default/pp-mtls"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{target: {service: productpage}, mtls: {mode: strictt}}", "mtls.mode"),
        ("{target: {service: productpage}, mtls: {mode: 1}}", "mtls.mode"),
        ("{mtls: {mode: strict}}", "mesh-wide it is Mesh.spec.mtls"),
        ("{target: {service: productpage, route: r}, mtls: {mode: strict}}", "a route cannot"),
    ],
)
def test_bad_mtls_values_are_rejected_with_file_and_line(spec: str, message: str) -> None:
    text = (
        _policy()
        + "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\n"
        + f"metadata: {{name: bad}}\nspec: {spec}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_text(text, source="mesh.yaml")
    line = text.count("\n", 0, text.index("name: bad")) + 2  # the spec line
    assert f"mesh.yaml:{line}" in str(info.value), str(info.value)
    assert message in str(info.value)


# --- servers that follow their service's mode --------------------------------------------------


class Signalling(Recorder):
    """A recorder the test can wait on (mirrored copies arrive after the call returns)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Condition()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await super().__call__(scope, receive, send)
        with self.seen:
            self.seen.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        with self.seen:
            return self.seen.wait_for(lambda: len(self.scopes) >= count, timeout)


@pytest.fixture
def servers(pki: PKI) -> Iterator[Callable[..., tuple[Any, meshlib.Mesh, Signalling]]]:
    """``run(service, text)`` → (server following ``service``'s mode, its mesh, recorder)."""
    running: list[tuple[Any, meshlib.Mesh]] = []

    def run(service: str, text: str, sid: SpiffeID) -> tuple[Any, meshlib.Mesh, Signalling]:
        svid = pki.ca.issue(sid).save(pki.root / service)
        mesh = meshlib.Mesh.from_text(text, service=service, registry=CollectorRegistry())
        recorder = Signalling()
        server = serve(
            meshlib.MeshMiddleware(recorder, mesh=mesh),
            mesh=mesh,
            svid_dir=str(svid),
            svid_poll_interval=None,
            lifespan="off",
        )
        running.append((server, mesh))
        return server, mesh, recorder

    yield run
    for server, mesh in running:
        server.stop()
        mesh.close()


def _plain(server: Any, path: str = "/") -> httpx.Response:
    with httpx.Client(timeout=5.0) as client:
        return client.get(f"http://127.0.0.1:{server.port}{path}")


def test_namespace_strict_with_a_permissive_service_override(pki: PKI, servers: Any) -> None:
    pp, _, pp_app = servers("productpage", _policy(), SERVER_ID)
    details, _, details_app = servers("details", _policy(), DETAILS_ID)
    assert (pp.mode, details.mode) == (MTLSMode.PERMISSIVE, MTLSMode.STRICT)

    # permissive: plaintext, TLS without a certificate and mTLS are all served on one port
    response = _plain(pp, "/p")
    assert (response.status_code, response.text) == (200, "-")
    with https_client(client_context(pki.ca)) as client:
        assert client.get(pp.url + "/t").text == "-"
    with https_client(client_context(pki.ca, pki.client_dir)) as client:
        assert client.get(pp.url + "/m").text == str(CLIENT_ID)
    assert [s["scheme"] for s in pp_app.scopes] == ["http", "https", "https"]

    # the strict sibling in the same namespace refuses plaintext and certificate-less TLS
    with pytest.raises(httpx.TransportError):
        _plain(details)
    with https_client(client_context(pki.ca)) as client, pytest.raises(httpx.TransportError):
        client.get(details.url + "/")
    assert details_app.scopes == []
    with https_client(client_context(pki.ca, pki.client_dir)) as client:
        assert client.get(details.url + "/").text == str(CLIENT_ID)


def test_client_uses_tls_only_where_the_mode_says(pki: PKI, servers: Any) -> None:
    """Mesh-wide disable, namespace legacy plain, productpage strict: the caller must speak
    TLS to one and plain HTTP to the other, or the call fails."""
    text = _policy(ns_mode="strict", svc_mode="strict").replace(
        "spec: {target: {namespace: default}, mtls: {mode: strict}}",
        "spec: {target: {namespace: default}, mtls: {mode: disable}}",
    )
    strict, _, strict_app = servers("productpage", text, SERVER_ID)
    plain, _, plain_app = servers("details", text, DETAILS_ID)
    assert (strict.mode, plain.mode) == (MTLSMode.STRICT, MTLSMode.DISABLE)
    text = text.replace('"127.0.0.1:1"', f'"127.0.0.1:{strict.port}"').replace(
        '"127.0.0.1:2"', f'"127.0.0.1:{plain.port}"'
    )
    with (
        meshlib.Mesh.from_text(
            text, service="web", registry=CollectorRegistry(), svid_dir=str(pki.client_dir)
        ) as mesh,
        mesh.client(timeout=5.0) as client,
    ):
        assert mesh.mtls_enabled("productpage.default") and not mesh.mtls_enabled("details.default")
        over_tls = client.get("http://productpage/")
        assert over_tls.text == str(CLIENT_ID)
        plain_response = client.get("http://details/")
        assert plain_response.status_code == 200
        # the decision record says which calls went over mTLS
        assert over_tls.extensions["mesh_decision"].mtls is True
        assert plain_response.extensions["mesh_decision"].as_dict()["mtls"] is False
    assert [s["scheme"] for s in strict_app.scopes] == ["https"]
    assert [s["scheme"] for s in plain_app.scopes] == ["http"]


def test_flip_strict_permissive_strict_under_load(pki: PKI, tmp_path: Path) -> None:
    """SEC-3: the server follows policy reloads; a meshed client calling all along sees no
    failure; plaintext is served only while permissive, and a plaintext keep-alive connection
    opened then is answered 403 once the mode is strict again."""
    path = tmp_path / "mesh.yaml"
    path.write_text(_policy(svc_mode="strict"))
    svid = pki.ca.issue(SERVER_ID).save(pki.root / "pp")
    server_mesh = meshlib.Mesh.from_file(
        path, service="productpage", watch=False, registry=CollectorRegistry()
    )
    server = serve(
        meshlib.MeshMiddleware(Recorder(), mesh=server_mesh),
        mesh=server_mesh,
        svid_dir=str(svid),
        svid_poll_interval=None,
        lifespan="off",
    )
    client_mesh = meshlib.Mesh.from_text(
        _policy(svc_mode="strict", ports=str(server.port)),
        service="web",
        registry=CollectorRegistry(),
        svid_dir=str(pki.client_dir),
    )
    stop = threading.Event()
    results: list[int | str] = []
    progress = threading.Condition()

    def record(result: int | str) -> None:
        with progress:
            results.append(result)
            progress.notify_all()

    def load() -> None:
        # one keep-alive client plus a fresh connection per call: both paths see the flips
        with client_mesh.client(timeout=5.0) as kept:
            while not stop.is_set():
                for c in (kept, None):
                    try:
                        if c is None:
                            with client_mesh.client(timeout=5.0) as fresh:
                                record(fresh.get("http://productpage/").status_code)
                        else:
                            record(c.get("http://productpage/").status_code)
                    except httpx.HTTPError as exc:
                        record(repr(exc))

    worker = threading.Thread(target=load)
    worker.start()
    try:

        def calls_since(n: int) -> None:  # let the meshed client make n more calls
            with progress:
                target = len(results) + n
                assert progress.wait_for(lambda: len(results) >= target, timeout=10)

        calls_since(20)
        with pytest.raises(httpx.TransportError):
            _plain(server)
        path.write_text(_policy(svc_mode="permissive"))
        assert server_mesh.reload() and server_mesh.mtls_mode() is MTLSMode.PERMISSIVE
        calls_since(20)
        with httpx.Client(timeout=5.0) as plain:  # one keep-alive plaintext connection
            url = f"http://127.0.0.1:{server.port}/"
            assert plain.get(url).status_code == 200
            path.write_text(_policy(svc_mode="strict"))
            assert server_mesh.reload() and server_mesh.mtls_mode() is MTLSMode.STRICT
            refused = plain.get(url)
            assert refused.status_code == 403
            assert refused.headers["x-mesh-reason"] == "unauthenticated"
        calls_since(20)
        with pytest.raises(httpx.TransportError):
            _plain(server)
    finally:
        stop.set()
        worker.join(10)
        client_mesh.close()
        server.stop()
        server_mesh.close()
    assert len(results) >= 60
    assert set(results) == {200}, [r for r in results if r != 200][:5]


def test_plain_bytes_that_look_like_nothing_are_closed_on_strict(pki: PKI, servers: Any) -> None:
    details, _, app = servers("details", _policy(), DETAILS_ID)
    with socket.create_connection(("127.0.0.1", details.port), timeout=5) as sock:
        sock.sendall(b"\x00garbage\r\n\r\n")
        assert sock.recv(100) == b""  # closed without an answer that could echo input
    assert app.scopes == []


def test_a_pinned_mode_ignores_the_policy(pki: PKI) -> None:
    """``mode=`` pins the server: pinned strict refuses plaintext and certificate-less TLS
    although the policy says permissive; pinned permissive serves plaintext although it says
    strict."""
    mesh = meshlib.Mesh.from_text(_policy(), service="productpage", registry=CollectorRegistry())
    svid = str(pki.ca.issue(SERVER_ID).save(pki.root / "pp"))
    kwargs: dict[str, Any] = {"svid_dir": svid, "svid_poll_interval": None, "lifespan": "off"}
    strict = serve(Recorder(), mesh=mesh, mode="strict", **kwargs)
    details = meshlib.Mesh.from_text(_policy(), service="details", registry=CollectorRegistry())
    permissive = serve(Recorder(), mesh=details, mode="permissive", **kwargs)
    try:
        assert (strict.mode, permissive.mode) == (MTLSMode.STRICT, MTLSMode.PERMISSIVE)
        with pytest.raises(httpx.TransportError):
            _plain(strict)
        with https_client(client_context(pki.ca)) as client, pytest.raises(httpx.TransportError):
            client.get(strict.url + "/")
        with https_client(client_context(pki.ca, pki.client_dir)) as client:
            assert client.get(strict.url + "/").status_code == 200
        assert _plain(permissive).status_code == 200
    finally:
        strict.stop()
        permissive.stop()
        mesh.close()
        details.close()


def test_split_backends_and_mirrors_each_use_their_own_mode(pki: PKI, servers: Any) -> None:
    """The root's mode does not decide for a split backend or a mirror target: each
    destination is called with TLS iff its own effective mode says so."""
    text = _policy(ns_mode="disable", svc_mode="strict")
    strict, _, strict_app = servers("productpage", text, SERVER_ID)  # strict by service policy
    plain, _, plain_app = servers("details", text, DETAILS_ID)  # disable by namespace policy
    text = (
        text.replace('"127.0.0.1:1"', f'"127.0.0.1:{strict.port}"').replace(
            '"127.0.0.1:2"', f'"127.0.0.1:{plain.port}"'
        )
        + "---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {name: shop}\n"
        + "---\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\n"
        + "metadata: {name: shop-split}\nspec:\n  service: shop\n"
        + "  backends: [{service: productpage, weight: 1}, {service: details, weight: 1}]\n"
        + "---\napiVersion: meshlib/v1\nkind: TrafficMirror\nmetadata: {name: copy}\n"
        + "spec: {service: shop, mirror: productpage, percent: 100}\n"
    )
    with (
        meshlib.Mesh.from_text(
            text, service="web", seed=3, registry=CollectorRegistry(), svid_dir=str(pki.client_dir)
        ) as mesh,
        mesh.client(timeout=5.0) as client,
    ):
        assert not mesh.mtls_enabled("shop.default")
        statuses = [client.get("http://shop/").status_code for _ in range(16)]
        # productpage gets its share of the split plus a mirrored copy of every call
        assert strict_app.wait_for(32 - len(plain_app.scopes)), len(strict_app.scopes)
    assert set(statuses) == {200}
    assert 0 < len(plain_app.scopes) < 16
    assert {s["scheme"] for s in plain_app.scopes} == {"http"}
    assert {s["scheme"] for s in strict_app.scopes} == {"https"}
