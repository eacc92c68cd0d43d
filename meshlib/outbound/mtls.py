"""Client side of the mesh's mutual TLS: inner httpx transports for calls to mesh services that
present this workload's SVID and check the server's SPIFFE ID before any request byte is sent.

httpx and httpcore have no public hook between the TLS handshake and the first write, so the
check lives in an httpcore *network backend*: its streams' ``start_tls`` runs the real
handshake (OpenSSL verifies the chain against the SVID bundle and, with a ``crl.pem``, that the
leaf is not revoked), then re-checks the peer's leaf as an SVID of the trust domain against the
*live* bundle and CRLs (which may be newer than the context the handshake used) and compares its
SPIFFE ID with the one expected for the endpoint ``(host, port)``. A mismatch closes the
connection and raises ``httpcore.ConnectError`` (``httpx.ConnectError`` to the caller): the
request never reached the server, so the mesh may retry it elsewhere for any method.

The expected identity of an endpoint is ``spiffe://<trust domain>/ns/<namespace>/sa/<service
account, or the service name>`` of the service that lists it, from the current snapshot
(re-derived when the snapshot version changes). An endpoint listed by two services with
different identities is refused (fail closed).

:class:`MeshTLSTransport` and :class:`AsyncMeshTLSTransport` subclass httpx's transports and
replace their private ``_pool`` with a pool using the verifying backend (httpx 0.28 keeps its
httpcore pool there and sends every request through it; tests/mtls/test_client_mtls.py pins
this, and the constructors fail loudly if the attribute is not the expected pool).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpcore
import httpx
from cryptography import x509

from meshlib.config.model import Snapshot
from meshlib.identity.spiffe import SpiffeID
from meshlib.identity.svid import SVIDError, verify_svid
from meshlib.identity.tls import SVIDSource, peer_chain

__all__ = ["AsyncMeshTLSTransport", "MeshTLSTransport", "PeerVerifier"]

log = logging.getLogger("meshlib.identity")

#: (expected SPIFFE ID, service key) or, for an ambiguous endpoint, (None, reason).
_Expected = tuple[SpiffeID | None, str]


def expected_identities(snapshot: Snapshot) -> dict[tuple[str, int], _Expected]:
    """Endpoint ``(host, port)`` → the SPIFFE ID its server must present, and the service."""
    td = snapshot.mesh.trust_domain
    found: dict[tuple[str, int], _Expected] = {}
    for service in snapshot.services.values():
        sid = SpiffeID.for_workload(td, service.namespace, service.service_account or service.name)
        for endpoint in service.endpoints:
            key = (endpoint.host.lower(), endpoint.port)
            previous = found.get(key)
            if previous is None:
                found[key] = (sid, service.key)
            elif previous[0] is not None and previous[0] != sid:
                reason = (
                    f"endpoint {endpoint.address} is listed by {previous[1]} ({previous[0]}) "
                    f"and {service.key} ({sid}); refusing it (ambiguous server identity)"
                )
                log.error("mTLS: %s", reason)
                found[key] = (None, reason)
    return found


class PeerVerifier:
    """Checks an established TLS connection's server against the expected identity."""

    def __init__(self, snapshot: Callable[[], Snapshot], source: SVIDSource) -> None:
        self._snapshot = snapshot
        self._source = source
        self._cache: tuple[int, Mapping[tuple[str, int], _Expected]] = (-1, {})

    def expected(self, host: str, port: int, snapshot: Snapshot | None = None) -> _Expected:
        if snapshot is None:
            snapshot = self._snapshot()
        version, mapping = self._cache
        if version != snapshot.version:
            mapping = expected_identities(snapshot)
            self._cache = (snapshot.version, mapping)  # one assignment: atomic
        found = mapping.get((host.lower().strip("[]"), port))
        if found is None:
            return None, f"{host}:{port} is not an endpoint of any mesh service"
        return found

    def client_context(self) -> ssl.SSLContext:
        """The context for a new connection: the SVID source's current one, swapped whole on
        rotation so no handshake sees a half-loaded pair (the pool's own context is not used)."""
        return self._source.current_client_context()

    def verify(self, host: str, port: int, ssl_object: Any) -> None:
        """Raise ``httpcore.ConnectError`` unless the peer is the expected workload."""
        snapshot = self._snapshot()  # one read: the expected ID and trust domain agree
        expected, service = self.expected(host, port, snapshot)
        if expected is None:
            raise httpcore.ConnectError(f"mTLS: {service}")
        leaf_der = None if ssl_object is None else ssl_object.getpeercert(True)
        if leaf_der is None:
            raise httpcore.ConnectError(f"mTLS: server {host}:{port} presented no certificate")
        chain = [x509.load_der_x509_certificate(der) for der in peer_chain(ssl_object, leaf_der)]
        try:
            actual = verify_svid(
                chain,
                self._source.bundle,
                trust_domain=snapshot.mesh.trust_domain,
                crls=self._source.crls,
            )
        except SVIDError as exc:
            raise httpcore.ConnectError(
                f"mTLS: server {host}:{port} for {service} is not a valid SVID: {exc.reason}"
            ) from None
        if actual != expected:
            raise httpcore.ConnectError(
                f"mTLS: server identity {actual} does not match expected {expected} "
                f"for {service} ({host}:{port})"
            )


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
        self, stream: httpcore.NetworkStream, host: str, port: int, verifier: PeerVerifier
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
    def __init__(self, verifier: PeerVerifier) -> None:
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


class MeshTLSTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` presenting the SVID and verifying the server's SPIFFE ID."""

    def __init__(
        self, ssl_context: ssl.SSLContext, verifier: PeerVerifier, *, limits: httpx.Limits | None
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
        self, stream: httpcore.AsyncNetworkStream, host: str, port: int, verifier: PeerVerifier
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
    def __init__(self, verifier: PeerVerifier) -> None:
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


class AsyncMeshTLSTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` presenting the SVID and verifying the server's SPIFFE ID."""

    def __init__(
        self, ssl_context: ssl.SSLContext, verifier: PeerVerifier, *, limits: httpx.Limits | None
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
