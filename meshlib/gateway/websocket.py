"""The gateway's WebSocket pass-through: the client's handshake, already routed and authorized
(:class:`meshlib.gateway.app.GatewayApp`), is repeated to one endpoint of the backend service
with ``wsproto`` over a connection from :meth:`meshlib.Mesh.stream_endpoint` (mTLS with the
gateway's SVID when the service uses it), then messages are relayed both ways until either
side closes.

* The client is accepted only once the backend has accepted, with the backend's subprotocol
  and response headers (hop-by-hop and handshake headers dropped, the rule's response header
  edits applied). A backend that refuses the handshake has its status, headers and body
  relayed (``websocket.http.response``); one that cannot be reached gets **502**
  ``connect_failure``, one that breaks the handshake **502** ``reset``.
* Text and binary messages keep their kind; pings are answered on each hop (uvicorn answers the
  client's, wsproto here the backend's); a close code and reason go through to the other side
  (1005 "no status" becomes 1000 — uvicorn reports a client's lost connection as 1005 too; a
  backend's connection lost without a close becomes 1011 towards the client — 1005, 1006 and
  1015 may not be sent).
* A message from the backend larger than ``max_message`` bytes closes both sides with 1009, as
  uvicorn does for the client's (``ws_max_size``, set to the same limit by the listeners).
* When one side goes away, the other is closed and everything is cancelled: a client that
  closes first leaves the backend :data:`CLOSE_TIMEOUT` seconds to answer the close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import ProtocolError

from meshlib.config.model import HeaderModifier
from meshlib.errors import Reason
from meshlib.gateway.edge import HOP_BY_HOP, relayed_headers
from meshlib.inbound.middleware import handshake_send
from meshlib.outbound.stream import StreamConnectError, StreamEndpoint

__all__ = ["CLOSE_TIMEOUT", "HANDSHAKE_HEADERS", "pass_through"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
#: The gateway's own refusal of the handshake: (status, reason, detail).
Refuse = Callable[[int, Reason, str], Awaitable[None]]

log = logging.getLogger("meshlib.gateway")

#: Seconds a backend has to answer a close the client started (uvicorn's close timeout).
CLOSE_TIMEOUT = 5.0
#: The handshake's own headers: each hop writes its own (wsproto adds the backend's).
HANDSHAKE_HEADERS = frozenset(
    {
        "host",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "sec-websocket-accept",
    }
)
#: Backend acceptance headers not relayed: hop-by-hop, the handshake's own, and ``date``
#: (uvicorn writes the gateway's own on the accept; a second one would repeat it).
_NOT_RELAYED = HOP_BY_HOP | HANDSHAKE_HEADERS | {"date"}
#: Backend refusal headers not relayed: hop-by-hop, and the length (the body may be cut).
_NOT_REFUSAL_RELAYED = HOP_BY_HOP | {"content-length"}
#: Bytes read from the backend at a time.
_READ_SIZE = 65536
#: Bound on a backend's refusal body relayed to the client.
_MAX_REFUSAL_BODY = 64 * 1024
#: Close codes that say something happened but may not be sent in a close frame (RFC 6455 §7.4.1).
_NO_STATUS, _ABNORMAL, _TLS_FAILURE = 1005, 1006, 1015


def _sendable(code: int | None, lost: int) -> int:
    """A close code that may be sent on: ``lost`` for a connection that ended without one."""
    if code is None or code == _NO_STATUS:
        return 1000
    if code in (_ABNORMAL, _TLS_FAILURE):
        return lost
    return code


async def pass_through(
    subprotocols: Sequence[str],
    extensions: object,
    receive: Receive,
    send: Send,
    refuse: Refuse,
    upstream: StreamEndpoint,
    *,
    host: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    response_edits: Sequence[HeaderModifier],
    max_message: int | None,
    timeout: float,
) -> None:
    """Open ``upstream``, shake hands for ``target`` (path and query) with ``host`` and
    ``headers``, accept the client (whose ``websocket.connect`` was received already) and
    relay until one side closes. ``extensions`` are the client scope's (a refusal is relayed
    as an HTTP answer where ``websocket.http.response`` is offered)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout  # the connection and the handshake, together
    try:
        try:
            reader, writer = await upstream.open(timeout)
        except StreamConnectError as exc:
            log.info("gateway WebSocket to %s: %s", upstream.service, exc)
            await refuse(502, Reason.CONNECT_FAILURE, f"cannot reach {upstream.service}")
            return
        try:
            await _shake_and_relay(
                subprotocols,
                extensions,
                receive,
                send,
                refuse,
                upstream,
                reader,
                writer,
                host=host,
                target=target,
                headers=headers,
                response_edits=response_edits,
                max_message=max_message,
                timeout=max(0.0, deadline - loop.time()),
            )
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
            except (OSError, TimeoutError):
                writer.transport.abort()  # a TLS peer that never answers our close_notify
    finally:
        upstream.release()  # also when cancelled: the endpoint's in-flight slot comes back


async def _shake_and_relay(
    subprotocols: Sequence[str],
    extensions: object,
    receive: Receive,
    send: Send,
    refuse: Refuse,
    upstream: StreamEndpoint,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    host: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    response_edits: Sequence[HeaderModifier],
    max_message: int | None,
    timeout: float,
) -> None:
    conn = WSConnection(ConnectionType.CLIENT)
    extra = [(n, v) for n, v in headers if n.lower() not in HANDSHAKE_HEADERS]
    writer.write(
        conn.send(
            Request(
                host=host,
                target=target,
                extra_headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in extra],
                subprotocols=list(subprotocols),
            )
        )
    )
    try:
        answer = await asyncio.wait_for(_handshake(conn, reader, writer), timeout)
    except (OSError, TimeoutError, ProtocolError) as exc:
        log.info("gateway WebSocket handshake with %s failed: %r", upstream.address, exc)
        await refuse(502, Reason.RESET, f"the WebSocket handshake with {upstream.service} failed")
        return
    if isinstance(answer, tuple):
        await _relay_refusal(extensions, send, *answer)
        return
    out = relayed_headers(answer.extra_headers, _NOT_RELAYED, response_edits)
    accept: Message = {"type": "websocket.accept", "headers": out}
    if answer.subprotocol is not None:
        accept["subprotocol"] = answer.subprotocol
    await send(accept)
    await _Relay(conn, reader, writer, receive, send, max_message).run()


async def _handshake(
    conn: WSConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> AcceptConnection | tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The backend's answer: its acceptance, or its refusal as (status, headers, body)."""
    await writer.drain()
    refusal: tuple[int, list[tuple[bytes, bytes]]] | None = None
    body = bytearray()
    while True:
        data = await reader.read(_READ_SIZE)
        conn.receive_data(data or None)
        for event in conn.events():
            if isinstance(event, AcceptConnection):
                return event
            if isinstance(event, RejectConnection):
                refusal = (event.status_code, list(event.headers))
                if not event.has_body:
                    return (*refusal, b"")
            elif isinstance(event, RejectData) and refusal is not None:
                body += event.data[: _MAX_REFUSAL_BODY - len(body)]
                if event.body_finished:
                    return (*refusal, bytes(body))
        if not data:
            if refusal is not None:
                return (*refusal, bytes(body))
            raise ConnectionResetError("the backend closed the connection during the handshake")


async def _relay_refusal(
    extensions: object, send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """The backend's refusal of the handshake, relayed as it came where the server can answer
    with HTTP, else a close before accept (:func:`meshlib.inbound.middleware.handshake_send`)."""
    answer = handshake_send(send, extensions if isinstance(extensions, Mapping) else {})
    kept = relayed_headers(headers, _NOT_REFUSAL_RELAYED, ())
    kept.append((b"content-length", str(len(body)).encode("ascii")))
    await answer({"type": "http.response.start", "status": status, "headers": kept})
    await answer({"type": "http.response.body", "body": body, "more_body": False})


class _Relay:
    """Both directions of one accepted WebSocket; the client's close is sent once."""

    def __init__(
        self,
        conn: WSConnection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        receive: Receive,
        send: Send,
        max_message: int | None,
    ) -> None:
        self.conn = conn
        self.reader = reader
        self.writer = writer
        self.receive = receive
        self.send = send
        self.max_message = max_message
        self.client_closed = False

    async def run(self) -> None:
        up = asyncio.ensure_future(self.from_backend())
        down = asyncio.ensure_future(self.from_client())
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if down in done and not up.done():
                # The client closed: the backend may still answer the close it was sent.
                await asyncio.wait({up}, timeout=CLOSE_TIMEOUT)
        finally:
            for task in (up, down):
                task.cancel()
            for task in (up, down):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def close_client(self, code: int, reason: str = "") -> None:
        if self.client_closed:
            return
        self.client_closed = True
        with contextlib.suppress(OSError):  # uvicorn's ClientDisconnected: already gone
            await self.send({"type": "websocket.close", "code": code, "reason": reason})

    def to_backend(self, event: Any) -> None:
        if self.conn.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self.writer.write(self.conn.send(event))

    async def from_client(self) -> None:
        """Client → backend, until the client's close (sent on) or a broken backend."""
        try:
            while True:
                message = await self.receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    data = message.get("bytes")
                    if data is not None:
                        self.to_backend(BytesMessage(data=data))
                    else:
                        self.to_backend(TextMessage(data=message.get("text") or ""))
                    await self.writer.drain()
                elif kind == "websocket.disconnect":
                    self.client_closed = True
                    code = _sendable(message.get("code"), lost=1001)
                    self.to_backend(CloseConnection(code=code, reason=message.get("reason") or ""))
                    await self.writer.drain()
                    return
        except OSError as exc:
            log.info("gateway WebSocket: the backend broke while sending to it: %r", exc)
            await self.close_client(1011, "backend connection lost")

    async def from_backend(self) -> None:
        """Backend → client, until the backend's close (sent on) or its connection's end."""
        parts: list[Any] = []
        size = 0
        try:
            while True:
                data = await self.reader.read(_READ_SIZE)
                self.conn.receive_data(data or None)
                for event in self.conn.events():
                    if isinstance(event, TextMessage | BytesMessage):
                        chunk = event.data
                        size += len(chunk.encode() if isinstance(chunk, str) else chunk)
                        if self.max_message is not None and size > self.max_message:
                            await self.too_big()
                            return
                        parts.append(event.data)
                        if event.message_finished:
                            message: Message
                            if isinstance(event, TextMessage):
                                message = {"type": "websocket.send", "text": "".join(parts)}
                            else:
                                message = {"type": "websocket.send", "bytes": b"".join(parts)}
                            parts, size = [], 0
                            if not self.client_closed:
                                await self.send(message)
                    elif isinstance(event, Ping):
                        self.to_backend(event.response())
                    elif isinstance(event, CloseConnection):
                        if self.conn.state is ConnectionState.REMOTE_CLOSING:
                            self.to_backend(event.response())
                        await self.close_client(
                            _sendable(event.code, lost=1011), event.reason or ""
                        )
                        return
                await self.writer.drain()
                if not data:
                    return
        except (OSError, ProtocolError) as exc:
            log.info("gateway WebSocket: the backend's connection broke: %r", exc)
            await self.close_client(1011, "backend connection lost")

    async def too_big(self) -> None:
        reason = f"message over {self.max_message} bytes"
        self.to_backend(CloseConnection(code=1009, reason=reason))
        with contextlib.suppress(OSError):
            await self.writer.drain()
        await self.close_client(1009, reason)
