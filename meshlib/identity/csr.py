"""Certificate signing requests: what a CSR sent to the registry may ask for, and how a workload
makes one.

The registry signs a CSR for an identity it already knows (a join token's, or the caller's
current SVID's): the CSR contributes only its public key. :func:`check_csr` refuses anything
that asks for more, each refusal naming what was wrong (:class:`CSRRefused`):

- the text must be PEM holding exactly one ``CERTIFICATE REQUEST`` block, at most
  :data:`MAX_CSR_BYTES`, whose self-signature verifies (the sender holds the private key);
- the key: EC P-256 or P-384, or RSA of at least 2048 bits; anything else is a weak key;
- no basicConstraints CA=true (a CSR for a CA is refused, not quietly downgraded);
- subjectAltName: none, or exactly one URI equal to the identity being signed for; another
  SPIFFE ID, a DNS name, an IP address or a second URI is refused;
- the subject is ignored (the leaf's subject is the CA's choice, ``O=meshlib``).
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from meshlib.identity.spiffe import IdentityError, SpiffeID

__all__ = ["ACCEPTED_KEYS", "MAX_CSR_BYTES", "CSRRefused", "check_csr", "make_csr"]

#: A CSR larger than this is refused before it is parsed (a P-384 or RSA-4096 CSR is < 2 KiB).
MAX_CSR_BYTES = 16 * 1024
#: EC curves accepted, by ``cryptography``'s curve name, with the name operators know.
_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
MIN_RSA_BITS = 2048
ACCEPTED_KEYS = "EC P-256, EC P-384 or RSA >= 2048 bits"

_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_CSR_LABELS = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")


class CSRRefused(IdentityError):
    """A CSR was refused; ``.reason`` says what was wrong with it."""


def check_csr(pem: bytes, spiffe_id: SpiffeID) -> x509.CertificateSigningRequest:
    """The CSR in ``pem`` if it may be signed for ``spiffe_id`` (see the module docstring);
    :class:`CSRRefused` naming the first rule it breaks."""
    if len(pem) > MAX_CSR_BYTES:
        raise CSRRefused(f"the CSR is {len(pem)} bytes, over the {MAX_CSR_BYTES}-byte limit")
    labels = _PEM_BEGIN.findall(pem)
    if not labels:
        raise CSRRefused("not a PEM CSR: no '-----BEGIN CERTIFICATE REQUEST-----' block")
    if len(labels) > 1:
        raise CSRRefused(f"the PEM holds {len(labels)} blocks; send exactly one CSR")
    if labels[0] not in _CSR_LABELS:
        found = labels[0].decode("ascii")
        raise CSRRefused(f"the PEM holds a {found!r} block, not a CERTIFICATE REQUEST")
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError:
        # Never echo the parser's text: it may quote input bytes.
        raise CSRRefused("the CERTIFICATE REQUEST block is not a valid PKCS#10 CSR") from None
    try:
        signed = csr.is_signature_valid
    except Exception:  # an unsupported signature algorithm cannot be checked: refuse it
        raise CSRRefused("the CSR's signature algorithm is not supported") from None
    if not signed:
        raise CSRRefused("the CSR's signature does not verify with its own key")
    _check_key(csr)
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension) as exc:
        raise CSRRefused(f"the CSR's extensions do not parse: {type(exc).__name__}") from None
    _check_not_ca(extensions)
    _check_names(extensions, spiffe_id)
    return csr


def _check_key(csr: x509.CertificateSigningRequest) -> None:
    try:
        key = csr.public_key()
    except Exception:  # cryptography refuses some key types it cannot represent
        raise CSRRefused(f"weak key: unsupported key type (accepted: {ACCEPTED_KEYS})") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            raise CSRRefused(f"weak key: EC curve {key.curve.name} (accepted: {ACCEPTED_KEYS})")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CSRRefused(f"weak key: RSA {key.key_size} bits (accepted: {ACCEPTED_KEYS})")
        return
    kind = type(key).__name__.lstrip("_").removesuffix("PublicKey")
    raise CSRRefused(f"weak key: {kind} keys are not accepted (accepted: {ACCEPTED_KEYS})")


def _check_not_ca(extensions: x509.Extensions) -> None:
    try:
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return
    if constraints.ca:
        raise CSRRefused("the CSR asks for a CA certificate (basicConstraints CA=true)")


def _check_names(extensions: x509.Extensions, spiffe_id: SpiffeID) -> None:
    try:
        names = list(extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return
    if not names:
        return
    if len(names) == 1 and names[0] == x509.UniformResourceIdentifier(str(spiffe_id)):
        return
    asked = ", ".join(_describe(name) for name in names[:5])
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    raise CSRRefused(
        f"the CSR asks for {asked}{more}; the identity comes from the token/certificate: "
        f"{spiffe_id}"
    )


def _describe(name: x509.GeneralName) -> str:
    kind = {
        x509.UniformResourceIdentifier: "URI",
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.RFC822Name: "email",
    }.get(type(name), type(name).__name__)
    return f"{kind}:{str(name.value)[:200]}"


def make_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, spiffe_id: SpiffeID | None
) -> bytes:
    """A PEM CSR for ``spiffe_id`` signed with ``key`` (the client side of :func:`check_csr`:
    the key never leaves the host, only this request does). ``None`` asks for no SAN at all: a
    host trading a join token does not know its identity yet, the registry takes the token's."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlib")])
    )
    if spiffe_id is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=False,
        )
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)
