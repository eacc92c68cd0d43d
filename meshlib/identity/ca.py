"""The built-in certificate authority: a root, X.509 SVIDs issued under it, and their files.

Certificates have the RFC 5280 shape strict TLS stacks demand (OpenSSL ``X509_STRICT``):

- root: EC P-256, self-signed, subject ``CN=meshlib root CA, O=meshlib``, URI SAN
  ``spiffe://<trust-domain>`` (as SPIRE does; it is also how :meth:`CertificateAuthority.load`
  learns the trust domain), basicConstraints critical CA=true pathlen 0, keyUsage critical
  keyCertSign + cRLSign, subject key identifier, 10 years.
- leaf (X509-SVID §4): EC P-256 (or the caller's key, when a CSR is signed), subject
  ``O=meshlib`` (SPIFFE ignores it; a non-empty subject keeps the SAN non-critical legal),
  exactly one URI SAN, basicConstraints critical CA=false,
  keyUsage critical digitalSignature, extendedKeyUsage serverAuth + clientAuth, SKI and AKI,
  random positive 128-bit serial, valid from one minute ago (clock skew) for ``ttl``.

Files are written atomically (temporary file in the same directory, then rename) so no reader
ever sees half a key; private keys are created 0600 and never pass through a wider mode.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlib.identity.bundle import TrustBundle
from meshlib.identity.spiffe import IdentityError, SpiffeID, SpiffeIDError

__all__ = [
    "DEFAULT_SVID_TTL",
    "DEFAULT_TRUST_DOMAIN",
    "ROOT_VALIDITY",
    "X509SVID",
    "CAError",
    "CertificateAuthority",
    "LeafPublicKey",
    "load_certificates",
    "new_serial",
    "uri_sans",
    "write_atomic",
]

DEFAULT_TRUST_DOMAIN = "cluster.local"
ROOT_VALIDITY = dt.timedelta(days=3650)
DEFAULT_SVID_TTL = dt.timedelta(hours=24)
#: NotBefore is backdated by this much so a peer whose clock is slightly behind accepts the cert.
CLOCK_SKEW = dt.timedelta(minutes=1)
ROOT_COMMON_NAME = "meshlib root CA"

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
SVID_CERT_FILE = "cert.pem"
SVID_KEY_FILE = "key.pem"
SVID_BUNDLE_FILE = "bundle.pem"

Clock = Callable[[], dt.datetime]
#: The keys a leaf may carry (what :func:`meshlib.identity.csr.check_csr` accepts).
LeafPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class CAError(IdentityError):
    """The CA could not be created, loaded or written (missing file, unsafe key mode, ...)."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_serial() -> int:
    """A leaf or root serial number."""
    # 128 random bits with the top bit cleared: positive, and at most 16 DER content octets.
    return secrets.randbits(127) | 1


@dataclass(frozen=True)
class X509SVID:
    """A workload's X.509 SVID: its leaf, any intermediates, its key and the trust bundle."""

    spiffe_id: SpiffeID
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    intermediates: tuple[x509.Certificate, ...] = ()
    bundle: tuple[x509.Certificate, ...] = ()
    #: Written as the bundle's sequence line (:mod:`meshlib.identity.bundle`); 0: none.
    bundle_sequence: int = 0

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Leaf first, then intermediates: what a TLS peer presents."""
        return (self.certificate, *self.intermediates)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``cert.pem`` (chain), ``key.pem`` (0600) and ``bundle.pem``; return the dir."""
        out = _ensure_dir(directory)
        write_atomic(out / SVID_KEY_FILE, _key_pem(self.key), mode=0o600)
        write_atomic(out / SVID_CERT_FILE, _certs_pem(self.chain), mode=0o644)
        bundle = TrustBundle(self.bundle, self.bundle_sequence).to_pem()
        write_atomic(out / SVID_BUNDLE_FILE, bundle, mode=0o644)
        return out


@dataclass(frozen=True)
class CertificateAuthority:
    """A root certificate and its key; issues X.509 SVIDs for one trust domain."""

    trust_domain: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def create(
        cls,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        validity: dt.timedelta = ROOT_VALIDITY,
        clock: Clock = _utcnow,
        common_name: str = ROOT_COMMON_NAME,
    ) -> CertificateAuthority:
        """A new self-signed EC P-256 root for ``trust_domain``. Roots that overlap during a
        rotation get different common names: CRLs are matched to roots by name."""
        td_id = SpiffeID.for_trust_domain(trust_domain)
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlib"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        now = clock()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(new_serial())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(td_id))]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain, cert, key)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        cert_file: str = CA_CERT_FILE,
        key_file: str = CA_KEY_FILE,
    ) -> CertificateAuthority:
        """Load ``ca.pem`` and ``ca-key.pem`` (or the given names); refuse a key file others
        can read."""
        base = Path(directory)
        cert_path, key_path = base / cert_file, base / key_file
        for path in (cert_path, key_path):
            if not path.is_file():
                raise CAError(f"{path} does not exist (run 'meshctl ca init --dir {base}')")
        mode = key_path.stat().st_mode & 0o777
        if os.name == "posix" and mode & 0o077:
            raise CAError(f"{key_path} is readable by others (mode {mode:04o}); chmod 600 it")
        certs = load_certificates(cert_path)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            # Never put the exception text here: some parsers echo input bytes.
            raise CAError(f"{key_path} is not an unencrypted PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{key_path} is not an EC private key")
        cert = certs[0]
        if cert.public_key() != key.public_key():
            raise CAError(f"{key_path} does not match the certificate in {cert_path}")
        ids = uri_sans(cert)
        try:
            td_id = SpiffeID.parse(ids[0]) if len(ids) == 1 else None
        except SpiffeIDError as exc:
            raise CAError(f"{cert_path}: bad trust domain URI SAN: {exc.reason}") from exc
        if td_id is None or not td_id.is_trust_domain:
            raise CAError(f"{cert_path} has no 'spiffe://<trust-domain>' URI SAN")
        return cls(td_id.trust_domain, cert, key)

    def save(
        self,
        directory: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        cert_file: str = CA_CERT_FILE,
        key_file: str = CA_KEY_FILE,
    ) -> Path:
        """Write ``ca.pem`` and ``ca-key.pem`` (0600), or the given names, into ``directory``
        (made 0700 if new)."""
        out = _ensure_dir(directory)
        key_path = out / key_file
        if key_path.exists() and not overwrite:
            raise CAError(f"{key_path} already exists; refusing to replace a root key")
        write_atomic(key_path, _key_pem(self.key), mode=0o600)
        write_atomic(out / cert_file, _certs_pem([self.certificate]), mode=0o644)
        return out

    @property
    def bundle(self) -> tuple[x509.Certificate, ...]:
        """The trust roots a peer needs to verify SVIDs from this CA."""
        return (self.certificate,)

    def issue(
        self,
        spiffe_id: SpiffeID,
        *,
        ttl: dt.timedelta = DEFAULT_SVID_TTL,
        clock: Clock = _utcnow,
        backdate: dt.timedelta = CLOCK_SKEW,
    ) -> X509SVID:
        """Issue an X.509 SVID for ``spiffe_id`` (which must be in this CA's trust domain),
        valid from ``backdate`` before now (peer clock skew) until ``ttl`` after now: a new
        EC P-256 key, and :meth:`sign` on its public half."""
        key = _new_key()
        cert = self.sign(key.public_key(), spiffe_id, ttl=ttl, clock=clock, backdate=backdate)
        return X509SVID(spiffe_id, cert, key, (), self.bundle)

    def sign(
        self,
        public_key: LeafPublicKey,
        spiffe_id: SpiffeID,
        *,
        ttl: dt.timedelta = DEFAULT_SVID_TTL,
        clock: Clock = _utcnow,
        backdate: dt.timedelta = CLOCK_SKEW,
        serial: int | None = None,
    ) -> x509.Certificate:
        """The leaf certificate (X509-SVID shape, see the module docstring) for ``spiffe_id``
        over a key the caller holds (from a CSR checked by
        :func:`meshlib.identity.csr.check_csr`); the same rules as :meth:`issue`. ``serial``
        (default: random, see :func:`new_serial`) lets a caller name the leaf before it
        exists (a join token records the serial it was used for)."""
        if spiffe_id.trust_domain != self.trust_domain:
            raise CAError(f"{spiffe_id} is not in this CA's trust domain {self.trust_domain!r}")
        if spiffe_id.is_trust_domain:
            raise CAError(f"{spiffe_id} has no path; a workload SVID needs one")
        if ttl <= dt.timedelta(0):
            raise CAError(f"ttl must be positive, got {ttl}")
        if backdate < dt.timedelta(0):
            raise CAError(f"backdate must not be negative, got {backdate}")
        if serial is not None and not 0 < serial < 2**159:
            raise CAError(f"serial must be positive and at most 20 octets, got {serial}")
        now = clock()
        not_after = min(now + ttl, self.certificate.not_valid_after_utc)
        issuer_ski = self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlib")]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(new_serial() if serial is None else serial)
            .not_valid_before(now - backdate)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Every URI in the certificate's subjectAltName (empty when it has none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """Every certificate in a PEM file, in order; :class:`CAError` if there is none."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CAError(f"cannot read {p}: {exc.strerror}") from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CAError(f"{p} holds no PEM certificate") from exc
    return certs


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certs_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _ensure_dir(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory)
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)
    elif not path.is_dir():
        raise CAError(f"{path} exists and is not a directory")
    return path


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write via a temp file in the same directory, then rename over ``path``.

    mkstemp creates the file 0600 whatever the umask, so a key is never briefly wider; the
    final mode is set on the descriptor before the rename makes the file visible. Replacing
    an existing (say 0644) file yields the new mode, unlike ``open(..., mode)`` on overwrite.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
