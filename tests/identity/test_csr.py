"""CSR checks and signing a caller's key: identity/csr.py and CertificateAuthority.sign."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from idcerts import T0, TD, WEB, at, make_ca

from meshlib.identity import SpiffeID, verify_svid
from meshlib.identity.csr import CSRRefused, check_csr, make_csr

ID = SpiffeID.parse(WEB)
OTHER = f"spiffe://{TD}/ns/default/sa/admin"


def _csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    *,
    names: list[x509.GeneralName] | None = None,
    ca: bool | None = None,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")])
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    csr = builder.sign(key or ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def _refused(pem: bytes) -> str:
    with pytest.raises(CSRRefused) as info:
        check_csr(pem, ID)
    return info.value.reason


def test_a_good_csr_passes_with_or_without_its_id() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    for pem in (make_csr(key, ID), _csr(key)):
        csr = check_csr(pem, ID)
        assert csr.public_key() == key.public_key()
    p384 = ec.generate_private_key(ec.SECP384R1())
    assert check_csr(make_csr(p384, ID), ID).public_key() == p384.public_key()
    rsa2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert check_csr(make_csr(rsa2048, ID), ID).public_key() == rsa2048.public_key()


def test_another_spiffe_id_is_refused_naming_both() -> None:
    reason = _refused(_csr(names=[x509.UniformResourceIdentifier(OTHER)]))
    assert f"asks for URI:{OTHER}" in reason
    assert f"the identity comes from the token/certificate: {WEB}" in reason


def test_extra_sans_are_refused() -> None:
    dns = _refused(_csr(names=[x509.UniformResourceIdentifier(WEB), x509.DNSName("evil.test")]))
    assert "DNS:evil.test" in dns
    second = _refused(
        _csr(names=[x509.UniformResourceIdentifier(WEB), x509.UniformResourceIdentifier(OTHER)])
    )
    assert f"URI:{WEB}, URI:{OTHER}" in second


def test_a_ca_csr_is_refused() -> None:
    assert "CA=true" in _refused(_csr(ca=True))
    assert check_csr(_csr(ca=False), ID)  # CA=false is what the leaf says anyway


def test_weak_keys_are_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert _refused(_csr(small)).startswith("weak key: RSA 1024 bits")
    k1 = ec.generate_private_key(ec.SECP256K1())
    assert _refused(_csr(k1)).startswith("weak key: EC curve secp256k1")


def test_a_bad_signature_is_refused() -> None:
    pem = make_csr(ec.generate_private_key(ec.SECP256R1()), ID)
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature's s
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    assert _refused(tampered) == "the CSR's signature does not verify with its own key"


def test_not_pem_or_two_csrs_are_refused() -> None:
    assert "not a PEM CSR" in _refused(b"hello")
    pem = make_csr(ec.generate_private_key(ec.SECP256R1()), ID)
    assert "2 blocks" in _refused(pem + pem)
    cert = make_ca().certificate.public_bytes(serialization.Encoding.PEM)
    assert "'CERTIFICATE' block" in _refused(cert)
    broken = pem.replace(pem.splitlines()[2], b"A" * 64)
    assert "not a valid PKCS#10 CSR" in _refused(broken)
    assert "over the" in _refused(b"x" * 20_000)


def test_the_signed_leaf_is_what_issue_makes_with_the_callers_key() -> None:
    ca = make_ca()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = check_csr(make_csr(key, ID), ID)
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    signed = ca.sign(public, ID, clock=at())
    issued = ca.issue(ID, clock=at()).certificate
    assert signed.public_key() == key.public_key()
    assert signed.subject == issued.subject and signed.issuer == issued.issuer
    assert (
        signed.not_valid_before_utc == issued.not_valid_before_utc == T0 - dt.timedelta(minutes=1)
    )
    assert signed.not_valid_after_utc == issued.not_valid_after_utc == T0 + dt.timedelta(hours=24)
    assert [(e.oid, e.critical) for e in signed.extensions] == [
        (e.oid, e.critical) for e in issued.extensions
    ]
    for ext in issued.extensions:
        if ext.oid != x509.SubjectKeyIdentifier.oid:  # the SKI is of each leaf's own key
            assert signed.extensions.get_extension_for_oid(ext.oid).value == ext.value
    ski = signed.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert verify_svid([signed], ca.bundle, now=T0) == ID
