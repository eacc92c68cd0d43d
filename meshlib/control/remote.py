"""Identity over the network, the workload's side: a first SVID traded for a join token
(:func:`bootstrap`), and renewals signed by the registry (:class:`RemoteIssuer`).

Both make the key here (EC P-256), send only a CSR and write the SVID directory layout
:class:`~meshlib.identity.tls.SVIDSource` reads (``cert.pem``, ``key.pem`` 0600 from its
creation, ``bundle.pem``; each file replaced atomically). The key never leaves the host.

Trust on first contact comes out of band, one of:

* a ``bundle.pem`` (``bundle_pem=``): the registry is verified against its roots;
* a join string's pin (``meshlib-join:v1:<url>:<sha256 hex of the root's SPKI DER>:<token>``):
  a first handshake only *collects* the chain the registry presents (nothing is sent on it),
  the certificate whose SubjectPublicKeyInfo hashes to the pin becomes the one trusted root,
  and the token then goes over a second handshake fully verified against that root, with the
  registry's SPIFFE ID pinned. A wrong pin fails before the token is sent. The registry
  presents its root because OpenSSL completes a server's chain from its trust store when
  ``cert.pem`` holds the leaf alone (what ``meshctl registry init`` writes).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshlib.control.client import RegistryClient, RegistryURLs, Signed
from meshlib.control.wire import JOIN_PREFIX
from meshlib.identity.bundle import TrustBundle
from meshlib.identity.ca import SVID_BUNDLE_FILE, SVID_CERT_FILE, SVID_KEY_FILE, X509SVID
from meshlib.identity.csr import make_csr
from meshlib.identity.spiffe import IdentityError, SpiffeID
from meshlib.identity.svid import SVIDError, verify_svid
from meshlib.identity.tls import SVIDSource

__all__ = [
    "JOIN_PREFIX",
    "BootstrapError",
    "JoinString",
    "RemoteIssuer",
    "bootstrap",
    "ensure_svid",
    "has_usable_svid",
    "join_registry",
    "parse_join",
    "pinned_bundle",
    "spki_sha256",
]

#: The join string's scheme and version.
_PIN = re.compile(r"^[0-9a-f]{64}$")


class BootstrapError(IdentityError):
    """A first SVID or a renewal that cannot be had; ``reason`` says why (never the token's
    secret)."""


@dataclass(frozen=True)
class JoinString:
    """A parsed join string: where the registry is, its root's SPKI pin and the token."""

    url: str
    root_spki_sha256: str
    token: str = ""

    def __repr__(self) -> str:  # the token is a secret: never in a log line or a traceback
        return f"JoinString(url={self.url!r}, root_spki_sha256={self.root_spki_sha256!r})"


def parse_join(text: object) -> JoinString:
    """``meshlib-join:v1:<registry URL>:<root SPKI sha256 hex>:<token>`` (split from the
    right: the URL has colons), else :class:`ValueError` naming the part that is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"a join string is a string, got {type(text).__name__}")
    text = text.strip()
    if not text.startswith(JOIN_PREFIX):
        raise ValueError(
            f"not a join string: it must start with {JOIN_PREFIX!r} "
            "(meshctl token create --join prints one)"
        )
    parts = text[len(JOIN_PREFIX) :].rsplit(":", 2)
    if len(parts) != 3:
        raise ValueError(
            "malformed join string: expected meshlib-join:v1:<registry URL>:<root SPKI sha256>:"
            f"<token>, found {len(parts)} part(s) after the prefix"
        )
    url, pin, token = parts
    where = urlsplit(url)
    if where.scheme != "https" or not where.hostname:
        raise ValueError(
            f"malformed join string: the registry URL {url!r} is not https://host[:port] "
            "(the registry speaks TLS only)"
        )
    try:
        where.port  # noqa: B018 - a property that raises on a malformed port
    except ValueError:
        raise ValueError(
            f"malformed join string: the registry URL {url!r} has a bad port"
        ) from None
    if not _PIN.match(pin):
        raise ValueError(
            "malformed join string: the root pin must be 64 lowercase hex characters (the "
            f"SHA-256 of the root's SubjectPublicKeyInfo), got {len(pin)} character(s)"
        )
    if not token:
        raise ValueError("malformed join string: the token (after the last ':') is empty")
    return JoinString(url, pin, token)


def join_registry(text: str) -> str | None:
    """The registry URL a join string names (None for a bare token); ValueError if it is a
    malformed join string."""
    return parse_join(text).url if text.strip().startswith(JOIN_PREFIX) else None


def spki_sha256(cert: x509.Certificate) -> str:
    """The SHA-256 hex of ``cert``'s SubjectPublicKeyInfo DER (what a join string pins)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def _presented_chain(tls: ssl.SSLSocket) -> list[x509.Certificate]:
    """The certificates the server sent, as sent (public on 3.13+, private before)."""
    getter = getattr(tls, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    raw = [] if getter is None else (getter() or [])
    out = []
    for cert in raw:
        der = cert if isinstance(cert, bytes) else cert.public_bytes(2)  # 2 = ENCODING_DER
        out.append(x509.load_der_x509_certificate(der))
    if not out:  # an interpreter without either: the leaf alone (a pin then cannot match)
        leaf = tls.getpeercert(True)
        if leaf:
            out.append(x509.load_der_x509_certificate(leaf))
    return out


def pinned_bundle(url: str, root_spki_sha256: str, *, timeout: float = 10.0) -> bytes:
    """The one-root bundle the join string's pin names, collected from the registry's own
    handshake (see the module docstring); :class:`BootstrapError` if no certificate presented
    there is a self-signed CA whose SPKI hashes to the pin.

    Nothing is trusted here and nothing is sent but the ClientHello: the root found is only a
    candidate, which :func:`bootstrap`'s real handshake then verifies the registry against."""
    where = urlsplit(url)
    host, port = where.hostname or "", where.port or 443
    collect = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    collect.minimum_version = ssl.TLSVersion.TLSv1_2
    # Collect, not trust: verification happens on the next connection, against the pin.
    collect.check_hostname = False
    collect.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            collect.wrap_socket(raw, server_hostname=host) as tls,
        ):
            presented = _presented_chain(tls)
    except OSError as exc:
        raise BootstrapError(f"cannot reach the registry at {url}: {exc}") from None
    for cert in presented:
        if spki_sha256(cert) != root_spki_sha256:
            continue
        if not _is_self_signed_ca(cert):
            raise BootstrapError(
                f"the certificate at {url} matching the pin ({cert.subject.rfc4514_string()}) "
                "is not a self-signed CA: a join string pins the trust domain's root"
            )
        return TrustBundle((cert,)).to_pem()
    seen = ", ".join(spki_sha256(c)[:16] + "…" for c in presented) or "nothing"
    raise BootstrapError(
        f"the server at {url} presented no root whose SPKI SHA-256 is {root_spki_sha256} "
        f"(it presented {seen}): a wrong join string, or not this registry; the token was "
        "not sent"
    )


def _is_self_signed_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        cert.verify_directly_issued_by(cert)
    except Exception:  # no constraints, another issuer, a bad signature: not a root
        return False
    return constraints.ca and cert.issuer == cert.subject


def has_usable_svid(svid_dir: str | Path, *, now: float | None = None) -> bool:
    """Whether ``svid_dir`` holds an SVID that loads and has not expired (else a join token
    is needed to start)."""
    directory = Path(svid_dir)
    if not all((directory / f).is_file() for f in (SVID_CERT_FILE, SVID_KEY_FILE)):
        return False
    if not (directory / SVID_BUNDLE_FILE).is_file():
        return False
    try:
        cert = SVIDSource(directory).material.certificate
    except Exception:  # unreadable, mismatched, not an SVID: not usable either way
        return False
    moment = time.time() if now is None else now
    return moment < cert.not_valid_after_utc.timestamp()


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _svid_of(signed: Signed, key: ec.EllipticCurvePrivateKey, url: str) -> X509SVID:
    """The answer as an SVID for ``key``, checked: chained to the bundle it came with, for the
    identity it names, and for our key (a registry answering for another key is a bug)."""
    try:
        chain = x509.load_pem_x509_certificates(signed.certificate.encode("ascii"))
        bundle = TrustBundle.parse(signed.bundle.encode("utf-8"), f"the bundle from {url}")
        spiffe_id = verify_svid(chain, bundle.roots, expected_id=signed.spiffe_id)
    except (ValueError, SVIDError, IdentityError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise BootstrapError(f"the registry at {url} answered an unusable SVID: {reason}") from None
    mine = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = (
        chain[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    if mine != theirs:
        raise BootstrapError(f"the registry at {url} signed another key than this CSR's")
    return X509SVID(
        spiffe_id,
        chain[0],
        key,
        intermediates=tuple(chain[1:]),
        bundle=bundle.roots,
        bundle_sequence=bundle.sequence,
    )


def bootstrap(
    url: str | Sequence[str] | RegistryURLs,
    token: str,
    svid_dir: str | Path,
    *,
    bundle_pem: bytes | None = None,
    root_spki_sha256: str | None = None,
    timeout: float = 10.0,
) -> X509SVID:
    """Trade join ``token`` at the registry ``url`` for a first SVID, written into
    ``svid_dir``; the registry is authenticated by ``bundle_pem`` (a bundle file's text) or
    by ``root_spki_sha256`` (a join string's pin, which names one registry), exactly one.
    With a bundle, ``url`` may list several registries (the client fails over between them).
    Raises :class:`BootstrapError` (or the client's ``RegistryError``: a refused token says
    why)."""
    if (bundle_pem is None) == (root_spki_sha256 is None):
        raise ValueError("bootstrap: give exactly one of bundle_pem or root_spki_sha256")
    urls = url if isinstance(url, RegistryURLs) else RegistryURLs(url)
    if root_spki_sha256 is not None:
        if len(urls.urls) != 1:
            raise ValueError("bootstrap: a pinned root is collected from one registry URL")
        bundle_pem = pinned_bundle(urls.url, root_spki_sha256, timeout=timeout)
    assert bundle_pem is not None
    key = _new_key()
    # No SAN: the identity is the token's, which the registry knows and this host need not.
    csr = make_csr(key, None)
    with RegistryClient.for_bootstrap(urls, bundle_pem=bundle_pem, timeout=timeout) as client:
        signed = client.sign(csr, token=token)
    svid = _svid_of(signed, key, urls.url)
    svid.save(svid_dir)  # key.pem first, 0600 from its creation (write_atomic)
    return svid


class RemoteIssuer:
    """An :class:`meshlib.identity.renewal.Issuer` backed by the registry's ``POST
    /v1/ca/sign``: a fresh key and CSR each time, authenticated by the SVID currently in
    ``svid_dir`` over mTLS (the registry signs for that SVID's identity)."""

    def __init__(
        self,
        url: str | Sequence[str] | RegistryURLs,
        svid_dir: str | Path,
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        #: The registry URLs (shared with the workload's other clients when given so).
        self.registry = url if isinstance(url, RegistryURLs) else RegistryURLs(url)
        self.svid_dir = Path(svid_dir)
        self.timeout = timeout
        self._clock = clock

    def issue(self, spiffe_id: SpiffeID) -> X509SVID:
        current = SVIDSource(self.svid_dir).material.certificate
        expired = current.not_valid_after_utc.timestamp()
        if self._clock() >= expired:
            at = dt.datetime.fromtimestamp(expired, dt.timezone.utc).isoformat(timespec="seconds")
            raise BootstrapError(
                f"SVID expired at {at}: a new join token is needed "
                f"(meshctl token create --spiffe-id {spiffe_id})"
            )
        key = _new_key()
        with RegistryClient(self.registry, svid_dir=str(self.svid_dir), timeout=self.timeout) as c:
            signed = c.sign(make_csr(key, spiffe_id))
        svid = _svid_of(signed, key, self.url)
        if svid.spiffe_id != spiffe_id:
            raise BootstrapError(
                f"the registry at {self.url} signed {svid.spiffe_id}, not {spiffe_id}"
            )
        return svid

    @property
    def url(self) -> str:
        """The registry URL in use now."""
        return self.registry.url

    def __repr__(self) -> str:
        return f"RemoteIssuer({','.join(self.registry.urls)!r}, {str(self.svid_dir)!r})"


def ensure_svid(
    url: str | Sequence[str] | RegistryURLs,
    svid_dir: str | Path,
    *,
    join_token: str | None = None,
    bundle: str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
) -> X509SVID | None:
    """Start-up's identity step (``Mesh.from_registry``): nothing when ``svid_dir`` holds a
    usable SVID or no ``join_token`` is given; else :func:`bootstrap` with it. ``join_token``
    is a join string (URL and root pin) or a bare token, which needs ``bundle`` (a bundle.pem
    path); with both, the bundle is what authenticates the registry. Returns the new SVID.

    ``url`` may list several registries: a join string names one of them, and the bootstrap
    goes to that one (its pin was collected there); with a bundle, to the list."""
    if join_token is None or has_usable_svid(svid_dir):
        return None
    urls = url if isinstance(url, RegistryURLs) else RegistryURLs(url)
    at: str | RegistryURLs = urls
    pin: str | None = None
    token = join_token.strip()
    if token.startswith(JOIN_PREFIX):
        join = parse_join(token)
        if join.url.rstrip("/") not in urls.urls:
            listed = ", ".join(urls.urls)
            raise ValueError(
                f"the join string is for the registry at {join.url}, not {listed}: "
                "create the token for this registry (meshctl token create --join)"
            )
        pin, token, at = join.root_spki_sha256, join.token, join.url.rstrip("/")
    bundle_pem: bytes | None = None
    if bundle is not None:
        try:
            bundle_pem = Path(bundle).read_bytes()
        except OSError as exc:
            raise BootstrapError(f"cannot read the bootstrap bundle {bundle}: {exc}") from None
        pin = None
    elif pin is None:
        raise ValueError(
            "a bare join token needs the registry's trust bundle (bundle=, MESHLIB_BUNDLE), "
            "or use the join string meshctl token create --join prints (it pins the root)"
        )
    if pin is None:
        at = urls  # a bundle authenticates every registry of the list
    return bootstrap(
        at, token, svid_dir, bundle_pem=bundle_pem, root_spki_sha256=pin, timeout=timeout
    )
