"""Verification of one request's JWT against the RequestAuthentication rules in force.

The order (RFC 8725):

1. find the token: exactly one occurrence across the rules' header locations; a header that
   is present but not of the configured form (``Bearer <token>``) is refused, so is a second
   token;
2. read the unverified header: ``crit`` is refused (no extension is supported), ``jku``,
   ``x5u`` and ``jwk`` are ignored — keys come only from the rule's configured JWKS;
3. pick the rule by the unverified ``iss`` (an unknown issuer is refused); the token's
   ``alg`` must be in that rule's allow-list (never ``none``, never HS*);
4. the key comes from the rule's JWKS by ``kid`` and must be of the algorithm's family and
   curve; PyJWT then checks the signature with that single algorithm, ``iss``, ``aud`` (when
   the rule lists audiences), ``exp`` (required), ``nbf`` and ``iat`` with the rule's skew.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from meshlib.config.authnmodel import JwtLocation, JwtRule
from meshlib.inbound.origin.jwks import JwksStore


class Unauthenticated(Exception):
    """The request carries a token that does not verify; the message says why (for logs —
    never sent to the client)."""


@dataclass(frozen=True)
class OriginPrincipal:
    """The verified end user: the token's issuer, subject and every claim."""

    issuer: str
    subject: str | None
    claims: Mapping[str, Any]

    @property
    def request_principal(self) -> str | None:
        """``"<iss>/<sub>"`` (what AuthorizationPolicy ``requestPrincipals`` match)."""
        return None if self.subject is None else f"{self.issuer}/{self.subject}"


class JwtVerifier:
    """Verifies request tokens; holds the JWKS caches (share one per inbound service)."""

    def __init__(self, store: JwksStore | None = None) -> None:
        self.store = store or JwksStore()

    async def authenticate(
        self, rules: Iterable[JwtRule], headers: Iterable[tuple[bytes, bytes]]
    ) -> OriginPrincipal | None:
        """The principal of the request's token; ``None`` without a token. Raises
        :class:`Unauthenticated` for a token (or token header) that does not verify."""
        rules = tuple(rules)
        token = find_token(rules, headers)
        if token is None:
            return None
        try:
            return await self._verify(rules, token)
        except Unauthenticated:
            raise
        except Exception as exc:  # a token must never turn into a 500
            raise Unauthenticated(f"token rejected: {type(exc).__name__}: {exc}") from None

    async def _verify(self, rules: tuple[JwtRule, ...], token: str) -> OriginPrincipal:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"malformed token: {exc}") from None
        if "crit" in header:
            raise Unauthenticated("token has a 'crit' header; no extension is supported")
        alg = header.get("alg")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthenticated("token 'kid' is not a string")
        issuer = unverified.get("iss")
        matching = [r for r in rules if r.issuer == issuer]
        if not isinstance(issuer, str) or not matching:
            raise Unauthenticated(f"no rule for issuer {issuer!r}")
        failure = "no rule accepted the token"
        for rule in matching:
            if not isinstance(alg, str) or alg not in rule.algorithms:
                failure = f"algorithm {alg!r} is not allowed for issuer {issuer!r}"
                continue
            keys = await self.store.source(rule).lookup(kid)
            candidates = keys.candidates(kid, alg) if keys is not None else []
            if not candidates:
                failure = f"no {alg} key with kid {kid!r} for issuer {issuer!r}"
                continue
            for key in candidates:
                try:
                    claims = jwt.decode(
                        token,
                        key=key,
                        algorithms=[alg],
                        audience=list(rule.audiences) or None,
                        issuer=rule.issuer,
                        leeway=rule.clock_skew,
                        options={"require": ["exp", "iss"], "verify_aud": bool(rule.audiences)},
                    )
                except jwt.InvalidSignatureError:
                    failure = "signature does not verify"
                    continue
                except jwt.PyJWTError as exc:
                    raise Unauthenticated(f"{type(exc).__name__}: {exc}") from None
                sub = claims.get("sub")
                return OriginPrincipal(issuer, sub if isinstance(sub, str) else None, claims)
        raise Unauthenticated(failure)


def find_token(rules: Iterable[JwtRule], headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The one token of the request, ``None`` if there is none; :class:`Unauthenticated` for
    a configured header that does not hold a token, or for more than one token."""
    locations: dict[str, list[JwtLocation]] = {}
    for rule in rules:
        for loc in rule.from_headers:
            if loc not in locations.setdefault(loc.name, []):
                locations[loc.name].append(loc)
    found: list[str] = []
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if name not in locations:
            continue
        value = raw_value.decode("latin-1").strip()
        for loc in locations[name]:
            prefix = loc.prefix
            if value[: len(prefix)].lower() == prefix.lower():
                token = value[len(prefix) :].strip()
                if token and " " not in token:
                    found.append(token)
                    break
        else:
            raise Unauthenticated(f"header {name!r} does not hold a token in the expected form")
    if len(found) > 1:
        raise Unauthenticated(f"{len(found)} tokens in one request; send exactly one")
    return found[0] if found else None
