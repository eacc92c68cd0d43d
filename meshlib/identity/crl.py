"""Certificate revocation lists: written by the CA, read by workloads.

``meshctl ca revoke`` keeps one CRL per root of the CA directory in ``crl.pem`` (PEM blocks
concatenated), each signed by its root, listing the serials that root revoked. A workload whose
SVID directory holds a ``crl.pem`` turns on CRL checking of the peer's leaf
(:mod:`meshlib.identity.tls`): OpenSSL (``VERIFY_CRL_CHECK_LEAF``) during the handshake and
:func:`~meshlib.identity.svid.verify_svid` afterwards. Checking fails closed: a leaf whose
issuer has no CRL in the file, or only an expired one, is refused, which is why the CA writes a
CRL for *every* root, revoked serials or not.

Each CRL's ``lastUpdate`` is later than the one it replaces (by a second if the clock has not
moved on): OpenSSL keeps every CRL loaded into a live context and picks the newest per issuer.
It is backdated by a minute, like certificates, so that this never puts it in the future
(OpenSSL would pass over a not-yet-valid CRL for the older one) and peers whose clock is a
little behind accept it.
A CRL is valid for :data:`CRL_VALIDITY`; re-sign before then (``meshctl ca revoke --dir DIR``
with no certificate) or every peer chained to that root is refused.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from meshlib.identity.ca import CLOCK_SKEW, CAError, CertificateAuthority

__all__ = [
    "CRL_FILE",
    "CRL_VALIDITY",
    "crls_pem",
    "issued_by",
    "load_crls",
    "parse_crls",
    "sign_crl",
]

CRL_FILE = "crl.pem"
CRL_VALIDITY = dt.timedelta(days=30)

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----\r?\n?", re.DOTALL)


def parse_crls(data: bytes, where: str) -> tuple[x509.CertificateRevocationList, ...]:
    """Every CRL in PEM ``data``; :class:`CAError` naming ``where`` if none or one is bad."""
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise CAError(f"{where} holds no PEM CRL")
    out = []
    for index, block in enumerate(blocks):
        try:
            out.append(x509.load_pem_x509_crl(block))
        except ValueError as exc:
            raise CAError(f"{where}: CRL {index + 1} of {len(blocks)} does not parse") from exc
    return tuple(out)


def load_crls(path: str | os.PathLike[str]) -> tuple[x509.CertificateRevocationList, ...]:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read {p}: {exc.strerror}") from exc
    return parse_crls(data, str(p))


def crls_pem(crls: Iterable[x509.CertificateRevocationList]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)


def sign_crl(
    ca: CertificateAuthority,
    serials: Sequence[tuple[int, dt.datetime]],
    *,
    previous: x509.CertificateRevocationList | None = None,
    now: dt.datetime,
    validity: dt.timedelta = CRL_VALIDITY,
) -> x509.CertificateRevocationList:
    """A CRL from ``ca`` revoking ``serials`` (serial, revocation date), numbered one past
    ``previous`` and issued strictly after it."""
    number = 1
    last_update = (now - CLOCK_SKEW).replace(microsecond=0)
    if previous is not None:
        try:
            number = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            number += 1
        except x509.ExtensionNotFound:
            pass
        floor = previous.last_update_utc + dt.timedelta(seconds=1)
        last_update = max(last_update, floor)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(last_update)
        .next_update(last_update + validity)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    for serial, when in serials:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(when.replace(microsecond=0))
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca.key, hashes.SHA256())


#: (signed bytes, signature, issuer) → valid: peers are re-checked on every new connection and
#: the signature check is most of the cost of a CRL lookup; the key covers everything signed.
_SIGNATURES: dict[tuple[bytes, bytes, x509.Certificate], bool] = {}
_SIGNATURES_MAX = 256


def issued_by(crl: x509.CertificateRevocationList, ca_cert: x509.Certificate) -> bool:
    """Whether ``crl`` names ``ca_cert`` as issuer and carries its valid signature."""
    if crl.issuer != ca_cert.subject:
        return False
    key = (crl.tbs_certlist_bytes, crl.signature, ca_cert)
    valid = _SIGNATURES.get(key)
    if valid is None:
        try:
            valid = crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
        except TypeError:
            valid = False
        if len(_SIGNATURES) >= _SIGNATURES_MAX:
            _SIGNATURES.clear()
        _SIGNATURES[key] = valid
    return valid
