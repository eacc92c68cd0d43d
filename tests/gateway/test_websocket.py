"""WebSocket pass-through at the ingress gateway (issue 14): a client speaking wsproto over a
real socket reaches a real uvicorn echo backend (``ws="wsproto"``) through the gateway's real
listeners (GatewayServer); text and binary messages and close codes go through both ways, an
oversized message from the backend closes both sides with 1009, an upgrade the gateway's
RequestAuthentication / AuthorizationPolicy refuses is answered 401 / 403 and never reaches the
backend, and over strict mTLS the backend sees the gateway's verified identity."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

import meshlib
from meshlib.gateway.edge import EdgeLimits
from meshlib.identity import CertificateAuthority, SpiffeID
from meshlib.inbound.serving import serve
from meshlib.outbound.stream import StreamConnectError
from tests.gateway.fixtures import (
    EDGE_AUTH,
    GATEWAY_HEAD,
    gateway_mesh,
    gateway_policy,
    start_gateway,
    tls_secret,
)
from tests.gateway.gwcerts import TestCA
from tests.gateway.running import RunningGateway
from tests.harness.server import run_uvicorn
from tests.inbound.origin.conftest import rsa_key, token
from tests.mtls.conftest import TD, mesh_text

pytestmark = pytest.mark.timeout(30)

GATEWAY_ID = SpiffeID.for_workload(TD, "edge", "gateway")
CHAT_ID = SpiffeID.for_workload(TD, "default", "chat")
EDGE_CA = TestCA.create("edge CA")
CHAT_CERT = EDGE_CA.leaf("chat.example.com")
LIMIT = 64 * 1024  # the gateway's message limit in these tests

GATEWAY = (
    GATEWAY_HEAD
    + """\
  - {name: http, port: 80, protocol: HTTP}
  - name: https
    hostname: chat.example.com
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: chat-cert}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: chat, namespace: edge}
spec:
  parentRefs: [{name: edge}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /chat}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: chat}]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: x-served-by, value: gateway}]
    backendRefs: [{name: chat, namespace: default, port: 8080}]
"""
)


@dataclass
class EchoSocket:
    """A WebSocket backend: accepts the first subprotocol offered, echoes text and binary
    messages (a path ending in ``/private`` is refused 451); ``"whoami"`` answers the
    verified caller (``x-mesh-identity``, or ``-``), ``"close:<code>"`` closes with that code,
    ``"big:<n>"`` sends n bytes."""

    scopes: list[dict[str, Any]] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)
    closed: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        self.scopes.append(dict(scope))
        await receive()  # websocket.connect
        if scope["path"].endswith("/private"):  # refused with an HTTP answer of its own
            headers = [(b"content-length", b"8"), (b"x-backend", b"echo")]
            await send({"type": "websocket.http.response.start", "status": 451, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": b"private\n"})
            return
        offered = scope.get("subprotocols") or []
        accept: dict[str, Any] = {"type": "websocket.accept", "headers": [(b"x-backend", b"echo")]}
        if offered:
            accept["subprotocol"] = offered[0]
        await send(accept)
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.closes.append(int(message.get("code", 1000)))
                self.closed.set()
                return
            text = message.get("text")
            if text == "whoami":
                identity = dict(scope["headers"]).get(b"x-mesh-identity", b"-").decode()
                await send({"type": "websocket.send", "text": identity})
            elif text is not None and text.startswith("close:"):
                await send({"type": "websocket.close", "code": int(text[6:]), "reason": "bye"})
                return
            elif text is not None and text.startswith("big:"):
                await send({"type": "websocket.send", "bytes": b"x" * int(text[4:])})
            elif text is not None:
                await send({"type": "websocket.send", "text": text})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.scopes[-1]["headers"])


class Client:
    """A WebSocket client: wsproto over a blocking socket (TLS when ``context`` is given)."""

    def __init__(
        self,
        port: int,
        target: str,
        *,
        host: str = "chat.example.com",
        headers: Sequence[tuple[str, str]] = (),
        subprotocols: Sequence[str] = (),
        context: ssl.SSLContext | None = None,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock: socket.socket = (
            raw if context is None else context.wrap_socket(raw, server_hostname=host)
        )
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.pending: deque[Event] = deque()
        extra = [(n.encode(), v.encode()) for n, v in headers]
        request = Request(
            host=host, target=target, extra_headers=extra, subprotocols=list(subprotocols)
        )
        self.sock.sendall(self.conn.send(request))

    def event(self) -> Event:
        while not self.pending:
            data = self.sock.recv(65536)
            self.conn.receive_data(data or None)
            self.pending.extend(self.conn.events())
        return self.pending.popleft()

    def accepted(self) -> AcceptConnection:
        event = self.event()
        assert isinstance(event, AcceptConnection), event
        return event

    def refused(self) -> tuple[int, dict[bytes, bytes], bytes]:
        event = self.event()
        assert isinstance(event, RejectConnection), event
        body = b""
        while event.has_body:
            data = self.event()
            assert isinstance(data, RejectData)
            body += data.data
            if data.body_finished:
                break
        return event.status_code, dict(event.headers), body

    def send(self, data: str | bytes) -> None:
        event = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
        self.sock.sendall(self.conn.send(event))

    def message(self) -> str | bytes | CloseConnection:
        """The next whole message, or the peer's close."""
        parts: list[Any] = []
        while True:
            event = self.event()
            if isinstance(event, CloseConnection):
                return event
            assert isinstance(event, TextMessage | BytesMessage), event
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)

    def close(self, code: int = 1000) -> None:
        self.sock.sendall(self.conn.send(CloseConnection(code=code)))

    def shut(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def client(port: int, target: str, **kwargs: Any) -> Iterator[Client]:
    c = Client(port, target, **kwargs)
    try:
        yield c
    finally:
        c.shut()


def _cut(ws: Client) -> bool:
    """Whether the server ended the connection without a word (a refused handshake)."""
    try:
        return ws.sock.recv(65536) == b""
    except OSError:  # the TLS alert of a refused client certificate
        return True


def _policy(port: int, extra: str = "", mtls: str = "disable") -> str:
    return gateway_policy({"default/chat": port}, mtls=mtls, extra=extra)


def _gateway(mesh: meshlib.Mesh, **options: Any) -> RunningGateway:
    return start_gateway(
        mesh,
        "---\n".join([GATEWAY, tls_secret("chat-cert", CHAT_CERT)]),
        ports={80: 0, 443: 0},
        limits=EdgeLimits(max_websocket_message_bytes=LIMIT),
        **options,
    )


@dataclass
class Plain:
    gateway: RunningGateway
    backend: EchoSocket
    backend_connections: list[int]


@contextlib.contextmanager
def plain_edge(extra_policy: str = "", **options: Any) -> Iterator[Plain]:
    """The gateway on plain HTTP in front of the echo backend (no mTLS)."""
    backend = EchoSocket()
    connections: list[int] = []

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            connections.append(1)
        await backend(scope, receive, send)

    server = run_uvicorn(counting, ws="wsproto", name="chat")
    mesh = gateway_mesh(_policy(server.port, extra_policy))
    gateway = _gateway(mesh, **options)
    try:
        yield Plain(gateway, backend, connections)
    finally:
        gateway.stop()
        server.stop()
        mesh.close()


@pytest.mark.timeout(30)
def test_text_and_binary_messages_are_echoed_through_the_gateway() -> None:
    with (
        plain_edge() as edge,
        client(
            edge.gateway.port(80),
            "/chat/room?id=7",
            headers=[("x-mesh-identity", "spiffe://shop.test/ns/x/sa/admin")],
            subprotocols=["chat.v2", "chat.v1"],
        ) as ws,
    ):
        accepted = ws.accepted()
        assert accepted.subprotocol == "chat.v2"  # the backend's choice, relayed
        assert [n for n, _ in accepted.extra_headers].count(b"date") == 1  # the gateway's
        answer = dict(accepted.extra_headers)
        assert answer[b"x-backend"] == b"echo"
        assert answer[b"x-served-by"] == b"gateway"
        ws.send("hello")
        assert ws.message() == "hello"
        payload = bytes(range(256)) * 200  # 51 200 bytes: several frames on the way
        ws.send(payload)
        assert ws.message() == payload
        ws.send("whoami")
        assert ws.message() == "-"  # the forged identity was stripped at the edge
        scope = edge.backend.scopes[0]
        assert scope["path"] == "/chat/room" and scope["query_string"] == b"id=7"
        headers = edge.backend.headers
        assert headers[b"host"] == b"chat.example.com"
        assert headers[b"x-route"] == b"chat"
        assert headers[b"x-forwarded-for"] == b"127.0.0.1"
        assert headers[b"x-forwarded-proto"] == b"http"
        assert b"x-mesh-identity" not in headers
        ws.close(4002)
        assert edge.backend.closed.wait(5)
        assert edge.backend.closes == [4002]
        reply = ws.message()
        assert isinstance(reply, CloseConnection) and reply.code == 4002


@pytest.mark.timeout(30)
def test_the_backends_close_code_and_reason_reach_the_client() -> None:
    with plain_edge() as edge, client(edge.gateway.port(80), "/chat") as ws:
        ws.accepted()
        ws.send("close:4001")
        closing = ws.message()
        assert isinstance(closing, CloseConnection)
        assert (closing.code, closing.reason) == (4001, "bye")


@pytest.mark.timeout(30)
def test_a_client_that_vanishes_closes_the_backend() -> None:
    with plain_edge() as edge, client(edge.gateway.port(80), "/chat") as ws:
        ws.accepted()
        ws.send("hi")
        assert ws.message() == "hi"
        ws.shut()  # no close frame: the connection is simply gone
        assert edge.backend.closed.wait(10)
        # uvicorn reports a lost connection as 1005 (no status), which may not be sent on.
        assert edge.backend.closes == [1000]


@pytest.mark.timeout(30)
def test_the_backends_refusal_of_the_handshake_is_relayed() -> None:
    with plain_edge() as edge, client(edge.gateway.port(80), "/chat/private") as ws:
        status, headers, body = ws.refused()
        assert (status, body) == (451, b"private\n")
        assert headers[b"x-backend"] == b"echo"


@pytest.mark.timeout(30)
def test_an_unreachable_backend_is_answered_502() -> None:
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    closed = spare.getsockname()[1]
    spare.close()  # nothing listens there now
    mesh = gateway_mesh(_policy(closed))
    gateway = _gateway(mesh)
    try:
        with client(gateway.port(80), "/chat") as ws:
            status, headers, _ = ws.refused()
            assert (status, headers[b"x-mesh-reason"]) == (502, b"connect_failure")
    finally:
        gateway.stop()
        mesh.close()


def test_a_stream_that_cannot_connect_ejects_its_endpoint_as_a_call_would() -> None:
    ports = []
    for _ in range(2):
        spare = socket.socket()
        spare.bind(("127.0.0.1", 0))
        ports.append(spare.getsockname()[1])
        spare.close()  # nothing listens there now
    chat = f"""---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: chat, namespace: default}}
spec:
  endpoints: [{{address: "127.0.0.1:{ports[0]}"}}, {{address: "127.0.0.1:{ports[1]}"}}]
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: chat-policy, namespace: default}}
spec:
  target: {{service: chat}}
  outlierDetection: {{consecutiveFailures: 1, baseEjectionTime: 30s, maxEjectionPercent: 50}}
"""
    registry = CollectorRegistry()
    mesh = meshlib.Mesh.from_text(
        mesh_text("disable") + chat, service="gateway", namespace="edge", registry=registry
    )
    try:
        upstream = mesh.stream_endpoint("chat.default")
        assert upstream is not None
        with pytest.raises(StreamConnectError):
            asyncio.run(upstream.open(5.0))
        (ejected,) = [
            s
            for s in mesh.destinations()["chat.default"].endpoints.states
            if s.is_ejected(mesh.clock())
        ]
        assert ejected.address == upstream.address
        labels = {
            "source": "gateway.edge",
            "destination": "chat.default",
            "endpoint": upstream.address,
        }
        assert registry.get_sample_value("mesh_endpoint_ejections_total", labels) == 1.0
    finally:
        mesh.close()


@pytest.mark.timeout(30)
def test_a_message_over_the_limit_closes_both_sides_with_1009() -> None:
    with plain_edge() as edge, client(edge.gateway.port(80), "/chat") as ws:
        ws.accepted()
        ws.send(f"big:{LIMIT}")
        assert ws.message() == b"x" * LIMIT  # at the limit: passed
        ws.send(f"big:{LIMIT + 1}")
        closing = ws.message()
        assert isinstance(closing, CloseConnection) and closing.code == 1009
        assert edge.backend.closed.wait(5)
        assert edge.backend.closes == [1009]


@pytest.mark.timeout(30)
def test_an_upgrade_without_a_route_is_answered_404() -> None:
    with plain_edge() as edge, client(edge.gateway.port(80), "/elsewhere") as ws:
        status, headers, body = ws.refused()
        assert status == 404
        assert headers[b"x-mesh-reason"] == b"no_route"
        assert body.startswith(b"no_route: no route of listener 'http'")
        assert edge.backend_connections == []


@pytest.mark.timeout(30)
def test_a_handshake_over_the_per_ip_rate_limit_is_answered_429() -> None:
    # One token, refilled every 100 s: the second handshake finds the bucket empty.
    with plain_edge(rate_limit_per_ip=(0.01, 1)) as edge:
        port = edge.gateway.port(80)
        with client(port, "/chat") as ws:
            ws.accepted()
        with client(port, "/chat") as ws:
            status, headers, _ = ws.refused()
            assert (status, headers[b"x-mesh-reason"]) == (429, b"rate_limited")
            assert headers[b"retry-after"] == b"100"
        assert edge.backend_connections == [1]


@pytest.mark.timeout(30)
def test_an_upgrade_the_edge_policy_refuses_never_reaches_the_backend() -> None:
    with plain_edge(EDGE_AUTH) as edge:
        port = edge.gateway.port(80)
        with client(port, "/chat") as ws:  # no token: no principal
            status, headers, _ = ws.refused()
            assert (status, headers[b"x-mesh-reason"]) == (403, b"denied")
        forged = token(rsa_key("other"))
        with client(port, "/chat", headers=[("authorization", f"Bearer {forged}")]) as ws:
            status, headers, _ = ws.refused()
            assert (status, headers[b"x-mesh-reason"]) == (401, b"unauthenticated")
        bob = token(sub="bob")
        with client(port, "/chat", headers=[("authorization", f"Bearer {bob}")]) as ws:
            assert ws.refused()[0] == 403
        assert edge.backend_connections == []
        alice = token()
        with client(port, "/chat", headers=[("authorization", f"Bearer {alice}")]) as ws:
            ws.accepted()
            ws.send("hi")
            assert ws.message() == "hi"
        assert edge.backend_connections == [1]


@pytest.fixture
def mesh_ca() -> CertificateAuthority:
    return CertificateAuthority.create(TD)


@pytest.mark.timeout(30)
def test_over_strict_mtls_the_backend_sees_the_gateways_identity(
    mesh_ca: CertificateAuthority, tmp_path: Path
) -> None:
    backend = EchoSocket()
    chat_mesh = meshlib.Mesh.from_text(
        mesh_text("strict"), service="chat", seed=7, registry=CollectorRegistry()
    )
    server = serve(
        meshlib.MeshMiddleware(backend, mesh=chat_mesh),
        mesh=chat_mesh,
        svid_dir=str(mesh_ca.issue(CHAT_ID).save(tmp_path / "chat")),
        svid_poll_interval=None,
        lifespan="off",
        ws="wsproto",
    )
    mesh = gateway_mesh(
        _policy(server.port, mtls="strict"),
        svid_dir=str(mesh_ca.issue(GATEWAY_ID).save(tmp_path / "gateway")),
    )
    gateway = _gateway(mesh)
    outside = ssl.create_default_context(cadata=EDGE_CA.pem.decode())
    try:
        with client(gateway.port(443), "/chat", context=outside) as ws:
            ws.accepted()
            ws.send("whoami")
            assert ws.message() == str(GATEWAY_ID)  # verified from the gateway's certificate
            assert backend.scopes[0]["scheme"] == "wss"
            ws.send(b"\x00\x01")
            assert ws.message() == b"\x00\x01"
            ws.close(1000)
            assert backend.closed.wait(5)
        # An outside client without an SVID cannot open the WebSocket on the backend itself.
        anyone = ssl.create_default_context()
        anyone.check_hostname, anyone.verify_mode = False, ssl.CERT_NONE
        with client(server.port, "/chat", context=anyone) as direct:
            assert _cut(direct)
        assert len(backend.scopes) == 1
    finally:
        gateway.stop()
        server.stop()
        mesh.close()
        chat_mesh.close()
