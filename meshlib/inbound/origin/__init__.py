"""Origin (end-user) authentication: JWTs verified against RequestAuthentication rules.

Loaded lazily by the inbound middleware, only once a RequestAuthentication applies to the
service: it imports PyJWT and cryptography, which plain meshes never need.
"""

from __future__ import annotations

from meshlib.inbound.origin.jwks import (
    FileJwks,
    InlineJwks,
    JwksFetchError,
    JwksSource,
    JwksStore,
    KeySet,
    UrlJwks,
)
from meshlib.inbound.origin.verify import JwtVerifier, OriginPrincipal, Unauthenticated, find_token

__all__ = [
    "FileJwks",
    "InlineJwks",
    "JwksFetchError",
    "JwksSource",
    "JwksStore",
    "JwtVerifier",
    "KeySet",
    "OriginPrincipal",
    "Unauthenticated",
    "UrlJwks",
    "find_token",
]
