"""Client side of the mesh's mutual TLS: inner httpx transports for calls to mesh services that
present this workload's SVID and check the server's SPIFFE ID before any request byte is sent.

The check runs in :mod:`meshlib.identity.pinned`'s transports, after the real TLS
handshake (OpenSSL verifies the chain against the SVID bundle and, with a ``crl.pem``, that the
leaf is not revoked), then re-checks the peer's leaf as an SVID of the trust domain against the
*live* bundle and CRLs (which may be newer than the context the handshake used) and compares its
SPIFFE ID with the one expected for the endpoint ``(host, port)``. A mismatch closes the
connection and raises ``httpcore.ConnectError`` (``httpx.ConnectError`` to the caller): the
request never reached the server, so the mesh may retry it elsewhere for any method.

The expected identity of an endpoint is ``spiffe://<trust domain>/ns/<namespace>/sa/<service
account, or the service name>`` of the service that lists it: in the current snapshot, or among
the endpoints discovered for that service from the registry (re-derived when the snapshot
version or the discovered sets change). An endpoint listed by two services with different
identities is refused (fail closed).

:class:`MeshTLSTransport` and :class:`AsyncMeshTLSTransport` are those transports (they
replace httpx's private ``_pool``: see :mod:`meshlib.identity.pinned`) with :class:`PeerVerifier`
as the check; the registry client reuses the same transports with its own pinned ID.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import httpcore

from meshlib.config.model import Endpoint, Snapshot
from meshlib.identity.pinned import AsyncPinnedTransport, PinnedTransport, server_svid
from meshlib.identity.spiffe import SpiffeID
from meshlib.identity.tls import SVIDSource

__all__ = ["AsyncMeshTLSTransport", "MeshTLSTransport", "PeerVerifier"]

log = logging.getLogger("meshlib.identity")

#: (expected SPIFFE ID, service key) or, for an ambiguous endpoint, (None, reason).
_Expected = tuple[SpiffeID | None, str]


class DiscoveredSets(Protocol):
    """The endpoints discovered per service from the registry (the mesh's), as the check reads
    them: ``generation`` changes whenever any set does, so the identities are re-derived only
    then, not per connection."""

    def generation(self) -> int: ...

    def endpoints(self, service_key: str) -> Sequence[Endpoint]: ...


def expected_identities(
    snapshot: Snapshot, discovered: DiscoveredSets | None = None
) -> dict[tuple[str, int], _Expected]:
    """Endpoint ``(host, port)`` → the SPIFFE ID its server must present, and the service.
    ``discovered`` endpoints count for the services the snapshot declares (a service it does
    not declare cannot be called, so its endpoints name no identity)."""
    td = snapshot.mesh.trust_domain
    found: dict[tuple[str, int], _Expected] = {}
    for service in snapshot.services.values():
        sid = SpiffeID.for_workload(td, service.namespace, service.service_account or service.name)
        extra = () if discovered is None else discovered.endpoints(service.key)
        for endpoint in (*service.endpoints, *extra):
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

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        source: SVIDSource,
        discovered: DiscoveredSets | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._source = source
        self._discovered = discovered
        self._cache: tuple[tuple[int, int], Mapping[tuple[str, int], _Expected]] = ((-1, -1), {})

    def expected(self, host: str, port: int, snapshot: Snapshot | None = None) -> _Expected:
        if snapshot is None:
            snapshot = self._snapshot()
        generation = 0 if self._discovered is None else self._discovered.generation()
        key, mapping = self._cache
        if key != (snapshot.version, generation):
            mapping = expected_identities(snapshot, self._discovered)
            self._cache = ((snapshot.version, generation), mapping)  # one assignment: atomic
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
        trust_domain = snapshot.mesh.trust_domain
        actual = server_svid(host, port, ssl_object, self._source, trust_domain, service)
        if actual != expected:
            raise httpcore.ConnectError(
                f"mTLS: server identity {actual} does not match expected {expected} "
                f"for {service} ({host}:{port})"
            )


class MeshTLSTransport(PinnedTransport):
    """``httpx.HTTPTransport`` presenting the SVID and verifying the server's SPIFFE ID."""


class AsyncMeshTLSTransport(AsyncPinnedTransport):
    """``httpx.AsyncHTTPTransport`` presenting the SVID and verifying the server's SPIFFE ID."""
