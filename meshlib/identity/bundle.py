"""Trust bundles that carry a sequence number, so a stale bundle can never replace a newer one.

SPIFFE bundles carry a ``spiffe_sequence`` that only increases; a consumer ignores a bundle
older than the one it holds. A PEM file has no field for it, so meshlib writes it as a comment
line that every PEM parser (OpenSSL, ``cryptography``) skips as text outside the blocks::

    # meshlib-bundle-sequence: 3
    -----BEGIN CERTIFICATE-----
    ...

At most one such line per file. A bundle without one has sequence 0: it is accepted while the
live bundle is unsequenced too, and ignored once a sequenced bundle is live.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshlib.identity.spiffe import IdentityError

__all__ = ["SEQUENCE_LINE", "BundleError", "TrustBundle", "load_bundle", "root_label"]

#: The carrier of the sequence number: ``# meshlib-bundle-sequence: N``.
SEQUENCE_LINE = "# meshlib-bundle-sequence:"
_SEQUENCE_RE = re.compile(rb"^#[ \t]*meshlib-bundle-sequence:[ \t]*(\S*)[ \t]*\r?$", re.MULTILINE)


class BundleError(IdentityError):
    """A bundle file is unreadable, empty or has a malformed sequence line."""


@dataclass(frozen=True)
class TrustBundle:
    """Trust roots and the bundle's sequence number (0: unsequenced)."""

    roots: tuple[x509.Certificate, ...]
    sequence: int = 0

    def to_pem(self) -> bytes:
        """The file form: the sequence line (when sequenced), then the roots."""
        head = f"{SEQUENCE_LINE} {self.sequence}\n".encode() if self.sequence else b""
        return head + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots)

    @classmethod
    def parse(cls, data: bytes, where: str) -> TrustBundle:
        """Parse a bundle file's bytes; ``where`` names it in errors."""
        found = _SEQUENCE_RE.findall(data)
        if len(found) > 1:
            raise BundleError(f"{where} has {len(found)} sequence lines; at most one")
        sequence = 0
        if found:
            text = found[0].decode("ascii", "replace")
            if not text.isdigit() or len(text) > 18:
                raise BundleError(f"{where}: bundle sequence {text[:20]!r} is not an integer >= 0")
            sequence = int(text)
        try:
            roots = tuple(x509.load_pem_x509_certificates(data))
        except ValueError as exc:
            raise BundleError(f"{where} holds no PEM certificate") from exc
        return cls(roots, sequence)


def load_bundle(path: str | os.PathLike[str]) -> TrustBundle:
    """Read and parse a bundle file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {p}: {exc.strerror}") from exc
    return TrustBundle.parse(data, str(p))


def root_label(cert: x509.Certificate) -> str:
    """How a root is named to operators: its subject and subject key identifier."""
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    return f"{cert.subject.rfc4514_string()} (SKI {ski.hex(':')})"
