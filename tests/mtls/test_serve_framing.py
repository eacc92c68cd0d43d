"""Request framing at ``meshlib.serve``'s parser, over raw sockets (NET-3, request smuggling):
every ambiguous framing is refused with one 400 and a closed connection, and nothing hidden
after the body reaches the app — plain HTTP (``disable``, and ``permissive``'s plaintext side)
and mTLS (``strict``) alike."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import pytest

from .conftest import PKI, Recorder, client_context

pytestmark = pytest.mark.timeout(20)

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def _post(*headers: str, body: bytes = b"0\r\n\r\n") -> bytes:
    head = "".join(f"{h}\r\n" for h in ("POST /first HTTP/1.1", "Host: x", *headers))
    return head.encode() + b"\r\n" + body + SMUGGLED


AMBIGUOUS = {
    # RFC 9112 §6.3: both framings — a front proxy may have used the other one
    "CL.TE": _post("Content-Length: 6", "Transfer-Encoding: chunked"),
    "TE.CL": _post("Transfer-Encoding: chunked", "Content-Length: 6"),
    "TE.CL different case": _post("transfer-encoding: chunked", "CONTENT-LENGTH: 6"),
    "TE chunked, identity": _post("Transfer-Encoding: chunked, identity"),
    "two TE headers": _post("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
    "two different CL": _post("Content-Length: 6", "Content-Length: 5"),
    "space before colon": _post("Transfer-Encoding : chunked"),
    "chunk size with junk": _post("Transfer-Encoding: chunked", body=b"0xyz\r\n\r\n"),
}


def _exchange(port: int, raw: bytes, ctx: ssl.SSLContext | None) -> bytes:
    """Send ``raw`` on a new connection and read until the server closes it (a server that
    keeps the connection open fails the read with a timeout)."""
    sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    if ctx is not None:
        sock = ctx.wrap_socket(sock)
    with sock:
        sock.sendall(raw)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


@pytest.fixture(params=["disable", "permissive", "strict"])
def served(request: pytest.FixtureRequest, pki: PKI, start: Any) -> tuple[Any, Recorder, Any]:
    """(server, recorder, client TLS context or None) for each mode's way in."""
    mode = request.param
    server, app = start(None if mode == "disable" else pki.server_dir, mode)
    ctx = client_context(pki.ca, pki.client_dir) if mode == "strict" else None
    return server, app, ctx


@pytest.mark.parametrize("raw", AMBIGUOUS.values(), ids=AMBIGUOUS.keys())
def test_ambiguous_framing_is_refused_and_the_connection_closed(
    served: tuple[Any, Recorder, Any], raw: bytes
) -> None:
    server, app, ctx = served
    received = _exchange(server.port, raw, ctx)  # returns only once the server closed
    assert received.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 501 ")), received[:80]
    assert received.count(b"HTTP/1.1 ") == 1, received  # no answer to a smuggled request
    assert all(scope["path"] != "/smuggled" for scope in app.scopes)
    if b"Content-Length: 6" in raw and b"chunked\r\n" in raw:
        assert app.scopes == []  # both framings: refused before the app saw anything


def test_well_framed_requests_still_share_a_connection(
    served: tuple[Any, Recorder, Any],
) -> None:
    """The connection still serves well-framed requests (chunked, then a length) in a row."""
    server, app, ctx = served
    chunked = (
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    length = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
    received = _exchange(server.port, chunked + length, ctx)
    assert received.count(b"HTTP/1.1 200 ") == 2, received
    assert [scope["path"] for scope in app.scopes] == ["/a", "/b"]
