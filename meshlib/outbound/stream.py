"""A long-lived connection to one endpoint of a mesh service (a WebSocket the ingress gateway
passes through), opened the way a call's attempt would be: the endpoint picked by the
service's load balancer among those not ejected, and, when mTLS applies, the mesh's client
context (this workload's SVID) with the server's SPIFFE ID checked against the endpoint's
before any byte is written (:class:`meshlib.outbound.mtls.PeerVerifier`).

A stream is not a call: no retries, hedges, per-try timeouts, circuit breaker or rate limit
apply to it (a WebSocket is not replayable once open); the endpoint counts it as in flight
until :meth:`StreamEndpoint.release`, and a failure to connect counts toward its ejection as a
failed attempt does.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["StreamConnectError", "StreamEndpoint"]


class StreamConnectError(ConnectionError):
    """The endpoint could not be reached, or its server is not the workload it should be."""


@dataclass(eq=False)
class StreamEndpoint:
    """One endpoint of ``service`` (``name.namespace``) chosen for a stream. ``tls`` is the
    client context when mTLS applies (None: plain TCP); ``verify(host, port, ssl_object)``
    raises unless the peer is the expected workload; ``ended(failed)`` gives the endpoint's
    in-flight slot back (``failed``: a connect failure, counted toward ejection)."""

    service: str
    host: str
    port: int
    tls: ssl.SSLContext | None
    verify: Callable[[str, int, Any], None] | None
    ended: Callable[[bool], None]
    released: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def open(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect (and handshake TLS, checking the server's identity) within ``timeout``
        seconds; :class:`StreamConnectError` otherwise, the endpoint told of the failure."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                ),
                timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self.release(failed=True)
            raise StreamConnectError(f"{self.service} at {self.address}: {exc!r}") from exc
        if self.tls is not None and self.verify is not None:
            try:
                self.verify(self.host, self.port, writer.get_extra_info("ssl_object"))
            except Exception as exc:  # the verifier's own error type (httpcore.ConnectError)
                writer.close()
                self.release(failed=True)
                raise StreamConnectError(str(exc)) from exc
        return reader, writer

    def release(self, *, failed: bool = False) -> None:
        """The stream ended (or never started): once, whatever calls it first."""
        if not self.released:
            self.released = True
            self.ended(failed)
