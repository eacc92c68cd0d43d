"""SPIFFE IDs: parsing and validation per the SPIFFE-ID standard, as a frozen value.

A SPIFFE ID is ``spiffe://<trust-domain><path>``: the scheme is exactly ``spiffe``; the trust
domain is lower-case letters, digits, ``.``, ``-`` and ``_`` (no port, no userinfo); the path is
zero or more ``/segment`` parts of ``[A-Za-z0-9._-]`` with no empty, ``.`` or ``..`` segment and
no trailing slash; there is no query, no fragment and no percent-encoding; the whole ID is at
most 2048 bytes. Anything else is rejected with a :class:`SpiffeIDError` naming the rule broken.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

__all__ = ["MAX_ID_BYTES", "MAX_TRUST_DOMAIN_BYTES", "IdentityError", "SpiffeID", "SpiffeIDError"]

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


class IdentityError(Exception):
    """Base of the identity errors; ``.reason`` is one line saying what was wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SpiffeIDError(IdentityError, ValueError):
    """A string is not a valid SPIFFE ID (or trust domain, or path segment)."""


def validate_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` unchanged, or raise :class:`SpiffeIDError` saying why it is bad."""
    if not trust_domain:
        raise SpiffeIDError("trust domain is empty")
    if len(trust_domain.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIDError(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    for ch in trust_domain:
        if ch in _TRUST_DOMAIN_CHARS:
            continue
        # The specific characters get specific reasons: they are the usual URL habits.
        if ch == ":":
            raise SpiffeIDError(f"trust domain {trust_domain!r} has a port; ports are not allowed")
        if ch == "@":
            raise SpiffeIDError(
                f"trust domain {trust_domain!r} has userinfo; userinfo is not allowed"
            )
        if ch.isupper():
            raise SpiffeIDError(f"trust domain {trust_domain!r} must be lower case")
        if ch == "%":
            raise SpiffeIDError(f"trust domain {trust_domain!r} has percent-encoding")
        raise SpiffeIDError(
            f"trust domain {trust_domain!r} has the character {ch!r}; "
            "only a-z, 0-9, '.', '-' and '_' are allowed"
        )
    return trust_domain


def validate_path(path: str) -> str:
    """Return ``path`` ("" or ``/seg/seg``) unchanged, or raise :class:`SpiffeIDError`."""
    if path == "":
        return path
    if not path.startswith("/"):
        raise SpiffeIDError(f"path {path!r} must start with '/'")
    for segment in path[1:].split("/"):
        _check_segment(segment, path)
    return path


def _check_segment(segment: str, path: str) -> None:
    if segment == "":
        raise SpiffeIDError(f"path {path!r} has an empty segment (or a trailing '/')")
    if segment in (".", ".."):
        raise SpiffeIDError(f"path {path!r} has a {segment!r} segment")
    for ch in segment:
        if ch in _SEGMENT_CHARS:
            continue
        if ch == "%":
            raise SpiffeIDError(f"path {path!r} has percent-encoding; it is not allowed")
        raise SpiffeIDError(
            f"path {path!r} has the character {ch!r}; "
            "only A-Z, a-z, 0-9, '.', '-' and '_' are allowed in a segment"
        )


@dataclass(frozen=True, order=True)
class SpiffeID:
    """A valid SPIFFE ID; the empty path is the ID of the trust domain itself."""

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        validate_path(self.path)
        if len(str(self).encode()) > MAX_ID_BYTES:
            raise SpiffeIDError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"

    @property
    def is_trust_domain(self) -> bool:
        """True for ``spiffe://td`` (a trust domain or CA), False for a workload ID."""
        return self.path == ""

    @classmethod
    def parse(cls, text: str) -> SpiffeID:
        """Parse ``spiffe://td/path``; raise :class:`SpiffeIDError` with the rule it breaks."""
        if not isinstance(text, str):
            raise SpiffeIDError(f"a SPIFFE ID is a string, got {type(text).__name__}")
        if len(text.encode()) > MAX_ID_BYTES:
            raise SpiffeIDError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
        if not text.startswith(SCHEME_PREFIX):
            scheme, sep, _ = text.partition("://")
            if sep and scheme.lower() == "spiffe":
                raise SpiffeIDError(f"scheme {scheme!r} must be exactly 'spiffe' (lower case)")
            if sep:
                raise SpiffeIDError(f"scheme {scheme!r} is not 'spiffe' in {text!r}")
            raise SpiffeIDError(f"{text!r} does not start with 'spiffe://'")
        rest = text[len(SCHEME_PREFIX) :]
        # Query and fragment are named before the generic character rules would catch them.
        if "?" in rest:
            raise SpiffeIDError(f"{text!r} has a query; a SPIFFE ID has none")
        if "#" in rest:
            raise SpiffeIDError(f"{text!r} has a fragment; a SPIFFE ID has none")
        trust_domain, slash, path = rest.partition("/")
        return cls(validate_trust_domain(trust_domain), slash + path)

    @classmethod
    def for_workload(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeID:
        """The Istio-style workload ID ``spiffe://<td>/ns/<namespace>/sa/<service-account>``."""
        for label, value in (("namespace", namespace), ("service account", service_account)):
            try:
                _check_segment(value, value)
            except SpiffeIDError as exc:
                raise SpiffeIDError(f"{label} {value!r} is not a valid path segment") from exc
        return cls(trust_domain, f"/ns/{namespace}/sa/{service_account}")

    @classmethod
    def for_trust_domain(cls, trust_domain: str) -> SpiffeID:
        """The ID of the trust domain itself, ``spiffe://<td>`` (carried by its CA)."""
        return cls(trust_domain)
