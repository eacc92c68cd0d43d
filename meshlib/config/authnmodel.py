"""The RequestAuthentication kind's part of the policy model, built by
:mod:`meshlib.config.authnkind` and used by the inbound side's JWT checks.

Kept out of :mod:`meshlib.config.model`, which re-exports every name, so a policy without the
kind does not pay for creating its dataclasses at import (start-up, issue 15).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlib.config.model import Origin


@dataclass(frozen=True, slots=True)
class JwtLocation:
    """Where a token is read from: header ``name`` (lower-case), value ``prefix`` + token."""

    name: str = "authorization"
    prefix: str = "Bearer "


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One ``jwtRules`` entry of a RequestAuthentication: how tokens of ``issuer`` verify.

    Exactly one JWKS source is set: ``jwks_uri`` (fetched), ``jwks`` (inline JSON text) or
    ``jwks_file`` (re-read when it changes). ``audiences`` empty: ``aud`` is not checked.
    ``algorithms`` are asymmetric JWS algorithms only (never ``none``, never HS*).
    """

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None
    jwks: str | None = None
    jwks_file: str | None = None
    from_headers: tuple[JwtLocation, ...] = (JwtLocation(),)
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    clock_skew: float = 60.0


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    """meshlib/v1 RequestAuthentication: JWT origin authentication for ``service`` (a service
    key) or, when ``None``, every service of ``namespace``."""

    name: str
    namespace: str
    service: str | None
    rules: tuple[JwtRule, ...]
    origin: Origin | None = None
