"""Verification of an X.509 SVID chain against trust roots, without a TLS handshake.

The checks follow X509-SVID §4–5, in this order, and the first failure raises
:class:`SVIDError` with a one-line reason:

1. leaf shape: basicConstraints present with CA=false; keyUsage present, critical, with
   digitalSignature and without keyCertSign / cRLSign; exactly one URI SAN, a valid SPIFFE ID
   with a workload path;
2. chain: every certificate is signed by the next one (or by a bundle root), issuers are CAs,
   and the chain ends at a root in the bundle ("unknown CA" otherwise);
3. time: every certificate of the path is inside its validity window at ``now``;
4. revocation (only when CRLs are given): the leaf's issuer has a current CRL and the leaf's
   serial is not on it. Like OpenSSL's ``VERIFY_CRL_CHECK_LEAF`` this fails closed: no CRL
   from the issuer, or an expired one, refuses the leaf;
5. identity: the trust domain, or the whole SPIFFE ID, is the one expected.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshlib.identity.bundle import root_label
from meshlib.identity.ca import uri_sans
from meshlib.identity.crl import issued_by
from meshlib.identity.spiffe import IdentityError, SpiffeID, SpiffeIDError

__all__ = ["MAX_CHAIN_LENGTH", "SVIDError", "describe_certificate", "spiffe_id_of", "verify_svid"]

#: Leaf + intermediates + root; longer chains are refused rather than searched.
MAX_CHAIN_LENGTH = 5


class SVIDError(IdentityError):
    """An X.509 SVID was rejected; ``.reason`` says what was wrong with it."""


def spiffe_id_of(cert: x509.Certificate) -> SpiffeID:
    """The SPIFFE ID in ``cert``'s single URI SAN; :class:`SVIDError` unless exactly one."""
    uris = uri_sans(cert)
    if not uris:
        raise SVIDError("certificate has no URI SAN (an SVID carries exactly one SPIFFE ID)")
    if len(uris) > 1:
        raise SVIDError(f"certificate has {len(uris)} URI SANs ({', '.join(uris)}); exactly one")
    try:
        return SpiffeID.parse(uris[0])
    except SpiffeIDError as exc:
        raise SVIDError(f"URI SAN {uris[0][:100]!r} is not a SPIFFE ID: {exc.reason}") from exc


def verify_svid(
    chain: Sequence[x509.Certificate],
    bundle: Iterable[x509.Certificate],
    *,
    now: dt.datetime | None = None,
    trust_domain: str | None = None,
    expected_id: SpiffeID | str | None = None,
    crls: Sequence[x509.CertificateRevocationList] | None = None,
) -> SpiffeID:
    """Verify ``chain`` (leaf first) against the ``bundle`` roots; return the leaf's SPIFFE ID.

    ``now`` defaults to the current time (inject it in tests). ``trust_domain`` and
    ``expected_id`` narrow what is accepted; the trust domain also applies when only the ID
    is given, since it is part of the ID. ``crls`` (``None``: no revocation checking) are the
    CRLs the leaf is checked against.
    """
    if not chain:
        raise SVIDError("no certificate presented")
    if len(chain) > MAX_CHAIN_LENGTH:
        raise SVIDError(f"chain of {len(chain)} certificates is longer than {MAX_CHAIN_LENGTH}")
    roots = list(bundle)
    if not roots:
        raise SVIDError("the trust bundle is empty")
    leaf = chain[0]
    spiffe_id = _check_leaf(leaf)
    path = _build_path(list(chain), roots)
    at = now if now is not None else dt.datetime.now(dt.timezone.utc)
    _check_validity(path, at)
    if crls is not None:
        _check_revocation(leaf, path[1], crls, at)
    if trust_domain is not None and spiffe_id.trust_domain != trust_domain:
        raise SVIDError(
            f"SPIFFE ID {spiffe_id} is in trust domain {spiffe_id.trust_domain!r}, "
            f"expected {trust_domain!r}"
        )
    if expected_id is not None:
        want = expected_id if isinstance(expected_id, SpiffeID) else SpiffeID.parse(expected_id)
        if spiffe_id != want:
            raise SVIDError(f"SPIFFE ID {spiffe_id} is not the expected {want}")
    return spiffe_id


def _check_leaf(leaf: x509.Certificate) -> SpiffeID:
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise SVIDError("leaf has no basicConstraints (an SVID must say CA=false)") from None
    if bc.ca:
        raise SVIDError("leaf is a CA certificate (basicConstraints CA=true)")
    try:
        ku_ext = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise SVIDError("leaf has no keyUsage extension") from None
    ku = ku_ext.value
    if not ku_ext.critical:
        raise SVIDError("leaf keyUsage is not marked critical")
    if not ku.digital_signature:
        raise SVIDError("leaf keyUsage lacks digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise SVIDError("leaf keyUsage has keyCertSign or cRLSign (only CAs may)")
    spiffe_id = spiffe_id_of(leaf)
    if spiffe_id.is_trust_domain:
        raise SVIDError(f"leaf SPIFFE ID {spiffe_id} has no path (that is a trust domain ID)")
    return spiffe_id


def _build_path(
    chain: list[x509.Certificate], roots: list[x509.Certificate]
) -> list[x509.Certificate]:
    """Follow issuers from the leaf to a bundle root; return leaf ... root."""
    path = [chain[0]]
    intermediates = chain[1:]
    while len(path) <= MAX_CHAIN_LENGTH:
        cert = path[-1]
        root = _find_issuer(cert, roots)
        if root is not None:
            _check_issuer_is_ca(root, "root")
            path.append(root)
            _check_path_lengths(path)
            return path
        issuer = _find_issuer(cert, intermediates)
        if issuer is None or issuer in path:
            break
        _check_issuer_is_ca(issuer, "intermediate")
        path.append(issuer)
    raise SVIDError(
        f"unknown CA: no trusted root signed the chain (issuer {path[-1].issuer.rfc4514_string()})"
    )


def _find_issuer(
    cert: x509.Certificate, candidates: Iterable[x509.Certificate]
) -> x509.Certificate | None:
    for candidate in candidates:
        if candidate == cert and cert.issuer != cert.subject:
            continue
        try:
            # Checks issuer name == candidate subject and the signature with its public key.
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return bool(bc.ca and ku.key_cert_sign)


def _check_issuer_is_ca(cert: x509.Certificate, role: str) -> None:
    if not _is_ca(cert):
        raise SVIDError(
            f"{role} {cert.subject.rfc4514_string()} is not a CA "
            "(needs basicConstraints CA=true and keyCertSign)"
        )


def _check_path_lengths(path: Sequence[x509.Certificate]) -> None:
    """RFC 5280 pathLenConstraint: a CA at ``path[i]`` may have at most N CAs below it."""
    for index in range(2, len(path)):
        limit = path[index].extensions.get_extension_for_class(x509.BasicConstraints).value
        below = index - 1  # intermediates between this CA and the leaf
        if limit.path_length is not None and below > limit.path_length:
            raise SVIDError(
                f"{path[index].subject.rfc4514_string()} allows {limit.path_length} "
                f"intermediate(s) below it, the chain has {below}"
            )


def _check_validity(path: Sequence[x509.Certificate], now: dt.datetime) -> None:
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.timezone.utc)
    for index, cert in enumerate(path):
        role = "leaf" if index == 0 else ("root" if index == len(path) - 1 else "intermediate")
        if now < cert.not_valid_before_utc:
            raise SVIDError(
                f"{role} certificate is not yet valid (notBefore "
                f"{cert.not_valid_before_utc.isoformat()}, now {now.isoformat()})"
            )
        if now > cert.not_valid_after_utc:
            raise SVIDError(
                f"{role} certificate has expired (notAfter "
                f"{cert.not_valid_after_utc.isoformat()}, now {now.isoformat()})"
            )


def _check_revocation(
    leaf: x509.Certificate,
    issuer: x509.Certificate,
    crls: Sequence[x509.CertificateRevocationList],
    now: dt.datetime,
) -> None:
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.timezone.utc)
    mine = [crl for crl in crls if issued_by(crl, issuer)]
    if not mine:
        raise SVIDError(
            f"no CRL from {root_label(issuer)}, the leaf's issuer "
            "(CRL checking is on and fails closed)"
        )
    crl = max(mine, key=lambda c: c.last_update_utc)
    next_update = crl.next_update_utc
    if now < crl.last_update_utc or (next_update is not None and now > next_update):
        raise SVIDError(
            f"the CRL from {root_label(issuer)} is not current (lastUpdate "
            f"{crl.last_update_utc.isoformat()}, nextUpdate "
            f"{next_update.isoformat() if next_update else '-'}, now {now.isoformat()})"
        )
    entry = crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
    if entry is not None:
        raise SVIDError(
            f"leaf serial {leaf.serial_number:x} was revoked by {root_label(issuer)} "
            f"on {entry.revocation_date_utc.isoformat()}"
        )


def describe_certificate(cert: x509.Certificate) -> list[tuple[str, str]]:
    """Label/value lines for ``meshctl ca inspect``: subject, SPIFFE ID, validity, issuer."""
    uris = uri_sans(cert)
    try:
        spiffe = str(spiffe_id_of(cert))
    except SVIDError as exc:
        spiffe = f"(invalid: {exc.reason})" if uris else "(none)"
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    return [
        ("subject", cert.subject.rfc4514_string() or "(empty)"),
        ("spiffe id", spiffe),
        ("issuer", cert.issuer.rfc4514_string() or "(empty)"),
        ("not before", cert.not_valid_before_utc.isoformat()),
        ("not after", cert.not_valid_after_utc.isoformat()),
        ("serial", f"{cert.serial_number:x}"),
        ("ca", "yes" if ca else "no"),
    ]
