"""Who a peer is, read from what an ASGI server's TLS extension says about its certificate: the
caller's verified SPIFFE ID, for the data plane's middleware and the registry alike. Pure
functions, no I/O.

A peer is a **verified member** of a trust domain only when the ASGI TLS extension
(``scope["extensions"]["tls"]``) carries a client certificate, the TLS layer reported no error
for it, and its single URI SAN is a workload SPIFFE ID in that trust domain.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

__all__ = ["peer_certificate", "spiffe_trust_domain", "verified_identity"]


def verified_identity(scope: Mapping[str, Any], trust_domain: str) -> str | None:
    """The caller's SPIFFE ID if it is a verified member of ``trust_domain``, else ``None``.

    Reads ``scope["extensions"]["tls"]`` (ASGI TLS extension): the server has already verified
    the chain against the mesh's roots; this only checks what the leaf says.
    """
    extensions = scope.get("extensions") or {}
    tls = extensions.get("tls") if isinstance(extensions, Mapping) else None
    if not isinstance(tls, Mapping) or tls.get("client_cert_error") is not None:
        return None
    chain = tls.get("client_cert_chain") or ()
    if not chain or not isinstance(chain[0], str):
        return None
    spiffe_id = _workload_id_of(chain[0])
    if spiffe_id is None or spiffe_trust_domain(spiffe_id) != trust_domain:
        return None
    return spiffe_id


def peer_certificate(scope: Mapping[str, Any]) -> str | None:
    """The PEM leaf the caller presented, if the TLS layer verified it (else ``None``): for a
    check beyond the identity, such as the registry's revocation check before renewing it."""
    extensions = scope.get("extensions") or {}
    tls = extensions.get("tls") if isinstance(extensions, Mapping) else None
    if not isinstance(tls, Mapping) or tls.get("client_cert_error") is not None:
        return None
    chain = tls.get("client_cert_chain") or ()
    return chain[0] if chain and isinstance(chain[0], str) else None


@lru_cache(maxsize=1024)
def spiffe_trust_domain(spiffe_id: str) -> str | None:
    """The trust domain of a well-formed workload SPIFFE ID, or ``None`` if it is malformed.
    Memoised: every request of a verified member asks it about the same few IDs (parsing one
    costs several microseconds)."""
    from meshlib.identity.spiffe import SpiffeID, SpiffeIDError

    try:
        parsed = SpiffeID.parse(spiffe_id)
    except SpiffeIDError:
        return None
    return None if parsed.is_trust_domain else parsed.trust_domain


@lru_cache(maxsize=1024)
def _workload_id_of(pem: str) -> str | None:
    """The SPIFFE ID in a PEM certificate's single URI SAN. Memoised: a keep-alive connection
    presents the same certificate on every request, and parsing it is the costly part."""
    # cryptography loads only when an identity is actually being checked: the inbound side
    # imports this module on every `import meshlib`.
    from cryptography import x509

    from meshlib.identity.svid import SVIDError, spiffe_id_of

    try:
        parsed = spiffe_id_of(x509.load_pem_x509_certificate(pem.encode("ascii")))
    except (ValueError, UnicodeEncodeError, SVIDError):
        return None
    return str(parsed)
