"""Certificates for the identity tests: a fixed clock and a crafter of malformed leaves."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlib.identity import CertificateAuthority

T0 = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
TD = "example.org"
WEB = f"spiffe://{TD}/ns/default/sa/web"


def at(t: dt.datetime = T0):  # type: ignore[no-untyped-def]
    """A clock that always answers ``t``."""
    return lambda: t


def make_ca(trust_domain: str = TD) -> CertificateAuthority:
    return CertificateAuthority.create(trust_domain, clock=at())


def craft_leaf(
    ca: CertificateAuthority,
    *,
    uris: tuple[str, ...] = (WEB,),
    basic_ca: bool | None = False,
    digital_signature: bool = True,
    key_cert_sign: bool = False,
    key_usage: bool = True,
    key_usage_critical: bool = True,
    not_before: dt.datetime = T0 - dt.timedelta(minutes=1),
    not_after: dt.datetime = T0 + dt.timedelta(hours=24),
    self_signed: bool = False,
) -> x509.Certificate:
    """A leaf signed by ``ca`` whose every SVID-relevant field can be bent out of shape."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlib")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if self_signed else ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if basic_ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=basic_ca, path_length=None), critical=True
        )
    if key_usage:
        ku = x509.KeyUsage(
            digital_signature=digital_signature,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=key_cert_sign,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(ku, critical=key_usage_critical)
    if uris:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key if self_signed else ca.key, hashes.SHA256())


def craft_intermediate(
    parent: CertificateAuthority, path_length: int | None = 0
) -> CertificateAuthority:
    """An intermediate CA signed by ``parent`` (same trust domain)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshlib intermediate")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    parent_ski = parent.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(parent.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(T0 - dt.timedelta(hours=1))
        .not_valid_after(T0 + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(parent_ski),
            critical=False,
        )
        .sign(parent.key, hashes.SHA256())
    )
    return CertificateAuthority(parent.trust_domain, cert, key)
