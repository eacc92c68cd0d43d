"""The inbound side of the mesh: ASGI middleware for requests arriving at this service.

``middleware`` drives one request through identity, header sanitation, authorization, rate
limits and the deadline; ``peer`` holds the pure trust decisions it relies on; ``origin``
verifies end-user JWTs; ``serving`` runs an app under uvicorn with the mesh's mutual TLS.
"""

from meshlib.inbound.middleware import UNAUTHENTICATED, MeshMiddleware, Verdict, send_local_reply
from meshlib.inbound.peer import (
    CONTROL_PREFIXES,
    IDENTITY_HEADER,
    IDENTITY_HEADERS,
    IDENTITY_PREFIXES,
    MAX_PROPAGATED_TIMEOUT,
    passes_unchanged,
    propagated_timeout,
    sanitize_headers,
    spiffe_trust_domain,
    verified_identity,
)

__all__ = [
    "CONTROL_PREFIXES",
    "IDENTITY_HEADER",
    "IDENTITY_HEADERS",
    "IDENTITY_PREFIXES",
    "MAX_PROPAGATED_TIMEOUT",
    "UNAUTHENTICATED",
    "MeshMiddleware",
    "Verdict",
    "passes_unchanged",
    "propagated_timeout",
    "sanitize_headers",
    "send_local_reply",
    "spiffe_trust_domain",
    "verified_identity",
]
