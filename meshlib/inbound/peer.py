"""What the inbound side may believe about a peer: its verified identity, which of its headers
survive the edge of the service, and the deadline it propagated. Pure functions, no I/O.

Trust model (SEC-9; Envoy's XFCC ``SANITIZE`` default, Linkerd's identity-header stripping):

* A peer is a **verified mesh member** only when the server's ASGI TLS extension carries a
  client certificate, the TLS layer reported no error for it, and its single URI SAN is a SPIFFE
  ID in the mesh's trust domain. Plain HTTP peers are never members.
* **Identity claims** (:data:`IDENTITY_HEADERS`, any ``x-meshlib-*``) are stripped from *every*
  peer, members included: identity is re-derived from the certificate and set as
  :data:`IDENTITY_HEADER`, never forwarded from what a peer says.
* **Mesh-internal control headers** (:data:`CONTROL_PREFIXES`: the propagated deadline, reason,
  fault controls, Envoy/Linkerd equivalents) pass only from verified members.
* Header names are compared with ``_`` read as ``-``; an underscore spelling of a controlled name
  is dropped from every peer (Envoy ``headers_with_underscores_action``).
"""

from __future__ import annotations

from collections.abc import Iterable

from meshlib.context import DEADLINE_HEADER

# Re-exported: the identity layer reads the caller's ID (the registry needs it too).
from meshlib.identity.peers import spiffe_trust_domain, verified_identity

__all__ = [
    "CONTROL_PREFIXES",
    "IDENTITY_HEADER",
    "IDENTITY_HEADERS",
    "IDENTITY_PREFIXES",
    "MAX_PROPAGATED_TIMEOUT",
    "passes_unchanged",
    "propagated_timeout",
    "sanitize_headers",
    "spiffe_trust_domain",
    "verified_identity",
]

#: Set by the middleware (and only by it) to the caller's verified SPIFFE ID.
IDENTITY_HEADER = "x-mesh-identity"

#: Headers that claim who the caller is: stripped from every peer, then re-derived.
IDENTITY_HEADERS = frozenset(
    {
        IDENTITY_HEADER,
        "x-mesh-peer",
        "x-forwarded-client-cert",  # Envoy XFCC
        "x-spiffe-id",
        "x-client-cert",
        "x-ssl-client-cert",
        "x-ssl-client-dn",
        "l5d-client-id",  # Linkerd
    }
)
#: Any header under these prefixes is an identity claim too (meshlib never sends them).
IDENTITY_PREFIXES = ("x-meshlib-",)
#: Mesh-internal headers (deadline, reason, fault controls): kept only from verified members.
CONTROL_PREFIXES = ("x-mesh-", "l5d-", "x-envoy-")

#: A propagated deadline longer than this is clamped to it (a garbage value must not pin a
#: handler's deadline far in the future, nor overflow a float).
MAX_PROPAGATED_TIMEOUT = 3600.0

_DEADLINE = DEADLINE_HEADER.encode("latin-1")


#: Verdict per raw header name: KEEP always, DROP always, MEMBER kept only from verified members.
_KEEP, _DROP, _MEMBER = 0, 1, 2
_FROM_MEMBER = frozenset({_KEEP, _MEMBER})
_FROM_OUTSIDER = frozenset({_KEEP})
#: Bound on memoised header names (names come from peers; past the bound, verdicts are computed
#: each time instead of remembered).
_MAX_NAME_CACHE = 4096
_name_verdicts: dict[bytes, int] = {}


def _verdict_of(name: bytes) -> int:
    verdict = _name_verdicts.get(name)
    if verdict is not None:
        return verdict
    lowered = name.lower()
    normal = lowered.replace(b"_", b"-").decode("latin-1")
    if normal in IDENTITY_HEADERS or normal.startswith(IDENTITY_PREFIXES):
        verdict = _DROP
    elif normal.startswith(CONTROL_PREFIXES):
        # an underscore spelling of a control header is dropped from every peer
        verdict = _MEMBER if lowered == normal.encode("latin-1") else _DROP
    else:
        verdict = _KEEP
    if len(_name_verdicts) < _MAX_NAME_CACHE:
        _name_verdicts[name] = verdict
    return verdict


def sanitize_headers(
    headers: Iterable[tuple[bytes, bytes]], identity: str | None
) -> list[tuple[bytes, bytes]]:
    """``headers`` as they may reach the app from a peer whose verified identity is ``identity``
    (``None``: not a mesh member): identity claims re-derived, control headers kept only from
    members. Verdicts are memoised per header name: on the inbound hot path a request usually
    repeats the names of the one before."""
    allowed = _FROM_MEMBER if identity is not None else _FROM_OUTSIDER
    kept = [(name, value) for name, value in headers if _verdict_of(name) in allowed]
    if identity is not None:
        kept.append((IDENTITY_HEADER.encode("latin-1"), identity.encode("latin-1")))
    return kept


def passes_unchanged(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether :func:`sanitize_headers` would keep all of ``headers`` from a peer that is not a
    mesh member, judged from memoised verdicts alone: the middleware then hands the server's
    list to the app instead of a copy. A name not seen before answers ``False`` (the caller
    sanitizes, which memoises it), so this never keeps a header sanitation would drop."""
    verdicts = _name_verdicts
    for name, _ in headers:
        if verdicts.get(name) != _KEEP:
            return False
    return True


def propagated_timeout(headers: Iterable[tuple[bytes, bytes]]) -> float | None:
    """Seconds left of the caller's deadline (``x-mesh-timeout-ms``), clamped to
    :data:`MAX_PROPAGATED_TIMEOUT`; ``None`` if absent or malformed. Read it only from headers
    that :func:`sanitize_headers` kept, i.e. from verified members. If the header repeats, the
    shortest value wins."""
    found: float | None = None
    for name, value in headers:
        if name.lower() != _DEADLINE:
            continue
        text = value.strip()
        if not text.isdigit() or len(text) > 12:
            continue  # sign, fraction, whitespace inside or absurd length: not ours
        seconds = min(int(text) / 1000.0, MAX_PROPAGATED_TIMEOUT)
        found = seconds if found is None else min(found, seconds)
    return found
