"""Attacks on a running ingress gateway (RELIABILITY.md NET-3, NET-4, SEC-9): a real
GatewayServer (uvicorn with the gateway's h11 protocol) on 127.0.0.1 in front of a real echo
backend, spoken to over raw sockets. Request smuggling attempts are refused with 400 and the
backend never sees the smuggled request; a dribbled head is cut by the head timeout; a slow
body by the route's deadline; a header flood gets 431, a long URL 414; identity, deadline and
fault headers from outside never reach the backend (issue 14)."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from meshlib.gateway.serve import EdgeTimeouts
from tests.gateway.fixtures import gateway_policy, running_gateway, web_gateway
from tests.gateway.running import RunningGateway
from tests.harness.echo import EchoBackend

GATEWAY = web_gateway(
    rules="""\
  - matches: [{path: {type: PathPrefix, value: /upload}}]
    timeouts: {request: 1s}
    backendRefs: [{name: web, namespace: shop, port: 8080}]
"""
)

#: A fault meant for one test user: a stranger sending the header must not trigger it.
FAULT = """\
---
apiVersion: meshlib/v1
kind: FaultInjection
metadata: {name: jason-abort, namespace: shop}
spec:
  target: {service: web}
  match: {headers: {end-user: jason}}
  abort: {status: 503, percent: 100}
"""

HEAD_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5


@dataclass
class Target:
    running: RunningGateway
    backend: EchoBackend

    @property
    def port(self) -> int:
        return self.running.port(80)


@pytest.fixture
def target() -> Iterator[Target]:
    backend = EchoBackend("web")
    backend.serve()
    try:
        with running_gateway(
            gateway_policy({"shop/web": backend.port}, extra=FAULT),
            GATEWAY,
            ports={80: 0},
            timeouts=EdgeTimeouts(header_timeout=HEAD_TIMEOUT, body_timeout=BODY_TIMEOUT),
        ) as running:
            yield Target(running, backend)
    finally:
        backend.stop()


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def _exchange(port: int, payload: bytes, wait: float = 5.0) -> tuple[list[int], bool]:
    """Send ``payload`` on a fresh connection; the status codes of every response read until
    the gateway closes the connection, and whether it did within ``wait`` seconds."""
    received = b""
    closed = True
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(payload)
        deadline = time.monotonic() + wait
        try:
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            pass
    return [int(code) for code in _STATUS.findall(received)], closed


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: shop.example.com\r\n\r\n"

#: Each is one request whose framing two parsers could read differently, followed by a second
#: request that a lenient reader would take out of the first one's body.
SMUGGLING = {
    "cl-te": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-cl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 4\r\n\r\n5c\r\n" + SMUGGLED + b"\r\n0\r\n\r\n",
    "duplicate-cl": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n"
    b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
    "cl-list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0, %d\r\n\r\n" % len(SMUGGLED)
    + SMUGGLED,
    "te-chunked-identity": b"POST / HTTP/1.1\r\nHost: a\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te-identity-cl": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n"
    b"Content-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED,
    "te-obs-fold": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n"
    b"Content-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n" + SMUGGLED,
    "space-before-colon": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n"
    b"Content-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "tab-in-te": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\tchunked\x0b\r\n"
    b"Content-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "bare-lf": b"GET / HTTP/1.1\nHost: a\n\n" + SMUGGLED,
    "bare-lf-in-one-line": b"GET / HTTP/1.1\r\nHost: a\nX-Other: b\r\n\r\n" + SMUGGLED,
    "bare-cr": b"GET / HTTP/1.1\r\nHost: a\rX-Other: b\r\n\r\n" + SMUGGLED,
    "te-http10": b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n" + SMUGGLED,
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_is_refused_and_the_second_request_never_reaches_the_backend(
    target: Target, name: str
) -> None:
    codes, closed = _exchange(target.port, SMUGGLING[name])
    assert codes == [400], f"{name}: the gateway answered {codes}"
    assert closed, f"{name}: the connection stayed open after the refusal"
    assert target.backend.requests == 0, target.backend.by_path
    # the gateway still serves an honest request
    codes, _ = _exchange(target.port, b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert codes == [200]
    assert target.backend.wait_for_requests(1)
    assert dict(target.backend.by_path) == {"/ok": 1}


@pytest.mark.timeout(20)
def test_an_honest_pipelined_pair_is_served_but_a_bad_second_head_is_refused(
    target: Target,
) -> None:
    honest = b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\n\r\n"
    codes, _ = _exchange(target.port, honest + b"GET /three HTTP/1.1\nHost: a\n\n", wait=3.0)
    assert codes == [200, 200, 400]
    assert target.backend.wait_for_requests(2)
    assert dict(target.backend.by_path) == {"/one": 1, "/two": 1}


@pytest.mark.timeout(30)
def test_a_head_dribbled_one_byte_a_second_is_cut_by_the_head_timeout(target: Target) -> None:
    head = b"GET / HTTP/1.1\r\nHost: shop.example.com\r\nX-Slow: " + b"a" * 20
    started = time.monotonic()
    cut = False
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
        sock.settimeout(1.0)  # paces the attacker: one byte, then wait up to 1 s for a close
        for byte in head:  # bounded: the head is 68 bytes
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    cut = True
                    break
            except TimeoutError:
                continue  # still open: the next byte
            except (ConnectionResetError, BrokenPipeError):
                cut = True
                break
    elapsed = time.monotonic() - started
    assert cut, "the gateway kept a connection whose head never finished"
    assert elapsed < HEAD_TIMEOUT + 3.0, elapsed
    assert target.backend.requests == 0


@pytest.mark.timeout(30)
def test_a_trickling_body_is_cut_by_the_route_deadline(target: Target) -> None:
    # One byte every 0.3 s never pauses long enough for the body timer; the route's 1 s
    # request timeout covers the upload: 408, and the backend never gets a whole request.
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        received = b""
        sock.settimeout(0.3)  # paces the attacker
        for _ in range(30):  # at most 30 of the 100 body bytes
            try:
                sock.sendall(b"x")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                break
            received += chunk
            if not chunk or b"\r\n\r\n" in received:
                break
        elapsed = time.monotonic() - started
    assert _STATUS.findall(received) == [b"408"], received
    assert b"x-mesh-reason: timeout" in received.lower()
    assert b"connection: close" in received.lower()
    assert elapsed < 5.0, elapsed
    assert target.backend.requests == 0


@pytest.mark.timeout(30)
def test_a_stalled_body_is_cut_by_the_body_timeout(target: Target) -> None:
    # The default route has no request timeout: the listener's body timer closes the
    # connection, and the gateway's call into the mesh is cancelled with it.
    with socket.create_connection(("127.0.0.1", target.port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
        started = time.monotonic()
        sock.settimeout(BODY_TIMEOUT + 5.0)
        try:
            rest = sock.recv(65536)
        except ConnectionResetError:
            rest = b""
        elapsed = time.monotonic() - started
    assert rest == b"", rest  # closed, nothing answered
    assert BODY_TIMEOUT * 0.9 < elapsed < BODY_TIMEOUT + 3.0, elapsed
    assert target.backend.requests == 0


@pytest.mark.timeout(20)
def test_a_header_flood_is_431(target: Target) -> None:
    many = b"".join(b"x-flood-%d: v\r\n" % i for i in range(1000))
    codes, closed = _exchange(target.port, b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")
    assert codes == [431] and closed
    big = b"x-big: " + b"v" * 100 * 1024 + b"\r\n"
    codes, closed = _exchange(target.port, b"GET / HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n")
    assert codes == [431] and closed
    assert target.backend.requests == 0


@pytest.mark.timeout(20)
def test_a_20_kb_url_is_414(target: Target) -> None:
    path = b"/" + b"a" * 20 * 1024
    codes, closed = _exchange(target.port, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert codes == [414] and closed
    assert target.backend.requests == 0


FORGED = {
    "x-mesh-identity": "spiffe://mesh.test/ns/shop/sa/admin",
    "x_mesh_identity": "spiffe://mesh.test/ns/shop/sa/admin",
    "x-forwarded-client-cert": "By=spiffe://mesh.test/ns/shop/sa/web;URI=spiffe://x/ns/a/sa/b",
    "x-spiffe-id": "spiffe://mesh.test/ns/shop/sa/admin",
    "x-mesh-timeout-ms": "1",
    "x-meshlib-caller": "admin",
    "x-envoy-fault-abort-request": "503",
    "l5d-client-id": "admin.shop.serviceaccount.identity.linkerd.cluster.local",
    "end-user": "jason",  # the FaultInjection's match: a stranger must not trigger it
}


@pytest.mark.timeout(20)
def test_forged_identity_deadline_and_fault_headers_never_reach_the_backend(
    target: Target,
) -> None:
    lines = b"".join(f"{k}: {v}\r\n".encode() for k, v in FORGED.items())
    request = b"GET /me HTTP/1.1\r\nHost: a\r\n" + lines + b"Connection: close\r\n\r\n"
    codes, _ = _exchange(target.port, request)
    assert codes == [200]  # the fault meant for jason did not fire
    assert target.backend.wait_for_requests(1)
    seen = {name.lower() for name in target.backend.last_headers}
    for name in FORGED:
        if name == "x-mesh-timeout-ms":
            continue  # the gateway's own deadline may go on: checked by value below
        assert name not in seen, f"{name} reached the backend"
    assert target.backend.last_headers.get("x-mesh-timeout-ms") != "1"
