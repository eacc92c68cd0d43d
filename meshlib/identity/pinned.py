"""httpx transports whose every new TLS connection is checked after the handshake and before any
request byte is sent: the SPIFFE check of a server for mesh calls (meshlib.outbound.mtls) and
for the registry client (meshlib.control.client), written once.

httpx and httpcore have no public hook between the TLS handshake and the first write, so the
check lives in an httpcore *network backend*: its streams' ``start_tls`` runs the real
handshake with the verifier's current client context, then calls ``verifier.verify(host, port,
ssl_object)``, which raises ``httpcore.ConnectError`` (``httpx.ConnectError`` to the caller) to
refuse the server; the connection is closed and the request never reached it.

:class:`PinnedTransport` and :class:`AsyncPinnedTransport` subclass httpx's transports and
replace their private ``_pool`` with a pool using the verifying backend (httpx 0.28 keeps its
httpcore pool there and sends every request through it; tests/mtls/test_client_mtls.py pins
this, and the constructors fail loudly if the attribute is not the expected pool).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any, Protocol

import httpcore
import httpx
from cryptography import x509

from meshlib.identity.spiffe import SpiffeID
from meshlib.identity.svid import SVIDError, verify_svid
from meshlib.identity.tls import SVIDSource, peer_chain

__all__ = ["AsyncPinnedTransport", "PinnedTransport", "ServerCheck", "server_svid"]


class ServerCheck(Protocol):
    """What the transports ask of a verifier: the client context for a new connection, and
    the check of the server it reached (raise ``httpcore.ConnectError`` to refuse it)."""

    def client_context(self) -> ssl.SSLContext: ...

    def verify(self, host: str, port: int, ssl_object: Any) -> None: ...


def server_svid(
    host: str, port: int, ssl_object: Any, source: SVIDSource, trust_domain: str, what: str
) -> SpiffeID:
    """The SPIFFE ID of the server at the other end of ``ssl_object``, re-checked as an SVID of
    ``trust_domain`` against ``source``'s *live* bundle and CRLs (which may be newer than the
    context the handshake used); ``httpcore.ConnectError`` naming ``what`` the server was
    supposed to be if it presented none or an invalid one."""
    leaf_der = None if ssl_object is None else ssl_object.getpeercert(True)
    if leaf_der is None:
        raise httpcore.ConnectError(f"mTLS: server {host}:{port} presented no certificate")
    chain = [x509.load_der_x509_certificate(der) for der in peer_chain(ssl_object, leaf_der)]
    try:
        return verify_svid(chain, source.bundle, trust_domain=trust_domain, crls=source.crls)
    except SVIDError as exc:
        raise httpcore.ConnectError(
            f"mTLS: server {host}:{port} for {what} is not a valid SVID: {exc.reason}"
        ) from None


#: httpx's own default limits, which ``httpx.HTTPTransport`` would apply.
_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


def _pool_limits(limits: httpx.Limits) -> dict[str, Any]:
    """``limits`` as httpcore pool arguments, as httpx passes them to the pool it builds."""
    return {
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
    }


# --- sync ---------------------------------------------------------------------------------------


class _VerifyingStream(httpcore.NetworkStream):
    def __init__(
        self, stream: httpcore.NetworkStream, host: str, port: int, verifier: ServerCheck
    ) -> None:
        self._stream = stream
        self._host = host
        self._port = port
        self._verifier = verifier

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, timeout)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        ssl_context = self._verifier.client_context()
        tls = self._stream.start_tls(ssl_context, server_hostname, timeout)
        try:
            self._verifier.verify(self._host, self._port, tls.get_extra_info("ssl_object"))
        except BaseException:
            tls.close()
            raise
        return tls

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _VerifyingBackend(httpcore.NetworkBackend):
    def __init__(self, verifier: ServerCheck) -> None:
        self._backend = httpcore.SyncBackend()
        self._verifier = verifier

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _VerifyingStream(stream, host, port, self._verifier)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:  # pragma: no cover - mesh endpoints are TCP
        raise httpcore.ConnectError("mTLS: unix sockets are not mesh endpoints")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class PinnedTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` presenting the SVID and checking each new connection's server
    with ``verifier`` before any request byte is written."""

    def __init__(
        self, ssl_context: ssl.SSLContext, verifier: ServerCheck, *, limits: httpx.Limits | None
    ) -> None:
        limits = limits or _DEFAULT_LIMITS
        super().__init__(verify=ssl_context, trust_env=False, limits=limits)
        if not isinstance(getattr(self, "_pool", None), httpcore.ConnectionPool):
            raise RuntimeError(  # pragma: no cover - guards the private attribute
                "httpx.HTTPTransport no longer keeps its pool in _pool; mTLS cannot be enforced"
            )
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            **_pool_limits(limits),
            network_backend=_VerifyingBackend(verifier),
        )


# --- async --------------------------------------------------------------------------------------


class _AsyncVerifyingStream(httpcore.AsyncNetworkStream):
    def __init__(
        self, stream: httpcore.AsyncNetworkStream, host: str, port: int, verifier: ServerCheck
    ) -> None:
        self._stream = stream
        self._host = host
        self._port = port
        self._verifier = verifier

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._stream.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._stream.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        ssl_context = self._verifier.client_context()
        tls = await self._stream.start_tls(ssl_context, server_hostname, timeout)
        try:
            self._verifier.verify(self._host, self._port, tls.get_extra_info("ssl_object"))
        except BaseException:
            await tls.aclose()
            raise
        return tls

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _AsyncVerifyingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, verifier: ServerCheck) -> None:
        self._backend = httpcore.AnyIOBackend()  # asyncio and trio, through anyio
        self._verifier = verifier

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._backend.connect_tcp(host, port, timeout, local_address, socket_options)
        return _AsyncVerifyingStream(stream, host, port, self._verifier)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:  # pragma: no cover - mesh endpoints are TCP
        raise httpcore.ConnectError("mTLS: unix sockets are not mesh endpoints")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class AsyncPinnedTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` presenting the SVID and checking each new connection's
    server with ``verifier`` before any request byte is written."""

    def __init__(
        self, ssl_context: ssl.SSLContext, verifier: ServerCheck, *, limits: httpx.Limits | None
    ) -> None:
        limits = limits or _DEFAULT_LIMITS
        super().__init__(verify=ssl_context, trust_env=False, limits=limits)
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError(  # pragma: no cover - guards the private attribute
                "httpx.AsyncHTTPTransport no longer keeps its pool in _pool; mTLS cannot be "
                "enforced"
            )
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            **_pool_limits(limits),
            network_backend=_AsyncVerifyingBackend(verifier),
        )
