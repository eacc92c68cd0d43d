"""Workload identity: SPIFFE IDs, the built-in CA and X.509 SVID verification.

Public names only; no logic lives here. See docs/security.md.
"""

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
