"""Workload identity: SPIFFE IDs, the built-in CA and X.509 SVID verification.

Public names only; no logic lives here. See docs/security.md. The names load on first use
(PEP 562): the inbound side reads peers' identities through :mod:`meshlib.identity.peers` on
every ``import meshlib``, which must not load ``cryptography`` until a certificate is checked.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshlib.identity.ca import (
        DEFAULT_SVID_TTL,
        DEFAULT_TRUST_DOMAIN,
        X509SVID,
        CAError,
        CertificateAuthority,
        load_certificates,
    )
    from meshlib.identity.spiffe import IdentityError, SpiffeID, SpiffeIDError
    from meshlib.identity.svid import SVIDError, spiffe_id_of, verify_svid

#: Public name -> the module defining it.
_HOMES = {
    "DEFAULT_SVID_TTL": "ca",
    "DEFAULT_TRUST_DOMAIN": "ca",
    "X509SVID": "ca",
    "CAError": "ca",
    "CertificateAuthority": "ca",
    "load_certificates": "ca",
    "IdentityError": "spiffe",
    "SpiffeID": "spiffe",
    "SpiffeIDError": "spiffe",
    "SVIDError": "svid",
    "spiffe_id_of": "svid",
    "verify_svid": "svid",
}

__all__ = [
    "DEFAULT_SVID_TTL",
    "DEFAULT_TRUST_DOMAIN",
    "X509SVID",
    "CAError",
    "CertificateAuthority",
    "IdentityError",
    "SVIDError",
    "SpiffeID",
    "SpiffeIDError",
    "load_certificates",
    "spiffe_id_of",
    "verify_svid",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'meshlib.identity' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"meshlib.identity.{home}"), name)
    globals()[name] = value
    return value
