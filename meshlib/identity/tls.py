"""TLS material for a workload: its X.509 SVID and trust bundle, loaded from files, as
``ssl.SSLContext`` objects, reloadable without ever breaking a live context.

:class:`SVIDSource` reads the ``meshctl ca issue --out`` layout (``cert.pem`` chain,
``key.pem``, ``bundle.pem``, which may hold several roots). :meth:`SVIDSource.reload` reads the
files again and validates the new pair in memory *before* touching anything live:

1. ``cert.pem`` parses and ``key.pem`` is an unencrypted EC key that matches its leaf;
2. the chain is a valid SVID for the bundle (:func:`~meshlib.identity.svid.verify_svid`) in the
   expected trust domain;
3. its SPIFFE ID is the one already served (unless ``allow_identity_change``).

Only then is the new pair loaded (``load_cert_chain``) into every context the source built, so
new connections present it and established ones keep theirs. A failed reload leaves every
context as it was, raises, and keeps its reason in :attr:`SVIDSource.last_error`.

Roots are only ever *added* to a live context (OpenSSL cannot forget one); the in-memory
:attr:`SVIDSource.bundle` does follow removals, and the server's SPIFFE re-check
(:mod:`meshlib.serving`) verifies peers against it, so a removed root stops authenticating
peers at the next connection.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshlib.identity.ca import (
    SVID_BUNDLE_FILE,
    SVID_CERT_FILE,
    SVID_KEY_FILE,
    CAError,
    load_certificates,
)
from meshlib.identity.spiffe import IdentityError, SpiffeID
from meshlib.identity.svid import SVIDError, verify_svid

__all__ = ["SVIDMaterial", "SVIDSource", "TLSConfigError"]

log = logging.getLogger("meshlib.identity.tls")


class TLSConfigError(IdentityError):
    """The SVID files could not be turned into TLS contexts (unreadable, mismatched, ...)."""


@dataclass(frozen=True)
class SVIDMaterial:
    """One validated SVID: its chain (leaf first), key bytes (PEM) and trust bundle."""

    spiffe_id: SpiffeID
    chain: tuple[x509.Certificate, ...]
    key_pem: bytes = field(repr=False)  # never in reprs, logs or exceptions
    bundle: tuple[x509.Certificate, ...]

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    @property
    def bundle_pem(self) -> str:
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in self.bundle)


class SVIDSource:
    """The SVID in ``directory``, validated, and the TLS contexts built from it.

    ``trust_domain`` (default: the trust domain of the SVID first loaded) is what every loaded
    SVID must belong to. A ``key.pem`` readable by group or others is logged as a warning, or
    refused with ``strict_key_permissions=True``. Not thread-safe by itself: call
    :meth:`reload` from the thread that serves the contexts
    (``meshlib.serving.Server.reload_svid`` does).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        trust_domain: str | None = None,
        allow_identity_change: bool = False,
        strict_key_permissions: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.allow_identity_change = allow_identity_change
        self.strict_key_permissions = strict_key_permissions
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._contexts: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet()
        self._fresh_client: ssl.SSLContext | None = None
        self._current = self._read(trust_domain)
        self.trust_domain = trust_domain or self._current.spiffe_id.trust_domain

    # -- what is loaded -------------------------------------------------------------------

    @property
    def material(self) -> SVIDMaterial:
        return self._current

    @property
    def spiffe_id(self) -> SpiffeID:
        return self._current.spiffe_id

    @property
    def bundle(self) -> tuple[x509.Certificate, ...]:
        return self._current.bundle

    # -- contexts -------------------------------------------------------------------------

    def server_context(self, *, require_client_cert: bool = True) -> ssl.SSLContext:
        """A server context: TLS >= 1.2, client certificates verified against the bundle,
        required (strict) or optional (permissive)."""
        ctx = self._base(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context presenting this SVID and verifying servers against the bundle.

        ``check_hostname`` is off: a SPIFFE ID is a URI SAN, not a DNS name; the caller checks
        the server's ID with :func:`~meshlib.identity.svid.verify_svid`.
        """
        ctx = self._base(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def current_client_context(self) -> ssl.SSLContext:
        """A client context for the pair loaded *now*, replaced (never modified) by
        :meth:`reload`: safe for handshakes in other threads while a reload runs, where
        loading a pair into a shared context has a window with the new certificate and no
        key. Mesh client transports take this one for each new connection."""
        ctx = self._fresh_client
        if ctx is None:
            with self._lock:
                material = self._current
            ctx = self._build(ssl.PROTOCOL_TLS_CLIENT, material, register=False)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
            with self._lock:
                if self._current is material:
                    self._fresh_client = ctx
        return ctx

    def _base(self, protocol: int) -> ssl.SSLContext:
        with self._lock:
            return self._build(protocol, self._current, register=True)

    def _build(self, protocol: int, material: SVIDMaterial, *, register: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if hasattr(ssl, "VERIFY_X509_STRICT"):
            ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        _load_pair(ctx, material)
        ctx.load_verify_locations(cadata=material.bundle_pem)
        if register:
            self._contexts.add(ctx)
        return ctx

    # -- reload ---------------------------------------------------------------------------

    def reload(self) -> bool:
        """Re-read the files; swap the new pair in only if it validates.

        Returns ``True`` if a different pair is now served, ``False`` if the files hold the
        one already loaded. Raises :class:`~meshlib.identity.IdentityError` (and sets
        :attr:`last_error`) if the new files are refused; nothing live changes then.
        """
        try:
            new = self._read(self.trust_domain)
            if new.spiffe_id != self._current.spiffe_id and not self.allow_identity_change:
                raise TLSConfigError(
                    f"new SVID is for {new.spiffe_id}, this workload is "
                    f"{self._current.spiffe_id}; refusing an identity change"
                )
        except IdentityError as exc:
            self.last_error = exc.reason
            raise
        if new.chain == self._current.chain and new.bundle == self._current.bundle:
            self.last_error = None
            return False
        with self._lock:
            old_bundle = set(self._current.bundle)
            added = [c for c in new.bundle if c not in old_bundle]
            added_pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in added)
            for ctx in list(self._contexts):
                _load_pair(ctx, new)  # validated above: cannot fail on a key mismatch
                if added_pem:
                    ctx.load_verify_locations(cadata=added_pem)
            self._current = new
            self._fresh_client = None
        self.last_error = None
        return True

    def _read(self, trust_domain: str | None) -> SVIDMaterial:
        base = self.directory
        cert_path, key_path = base / SVID_CERT_FILE, base / SVID_KEY_FILE
        bundle_path = base / SVID_BUNDLE_FILE
        chain = tuple(load_certificates(cert_path))
        bundle = tuple(load_certificates(bundle_path))
        try:
            key_pem = key_path.read_bytes()
            mode = key_path.stat().st_mode & 0o777
        except OSError as exc:
            raise CAError(f"cannot read {key_path}: {exc.strerror}") from exc
        if os.name == "posix" and mode & 0o077:
            message = f"{key_path} is readable by others (mode {mode:04o}); chmod 600 it"
            if self.strict_key_permissions:
                raise TLSConfigError(message)
            log.warning("%s", message)
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise TLSConfigError(f"{key_path} is not an unencrypted PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TLSConfigError(f"{key_path} is not an EC private key")
        if chain[0].public_key() != key.public_key():
            raise TLSConfigError(f"{key_path} does not match the certificate in {cert_path}")
        try:
            spiffe_id = verify_svid(chain, bundle, trust_domain=trust_domain)
        except SVIDError as exc:
            raise SVIDError(f"{cert_path}: {exc.reason}") from exc
        return SVIDMaterial(spiffe_id, chain, key_pem, bundle)


def _load_pair(ctx: ssl.SSLContext, material: SVIDMaterial) -> None:
    """``load_cert_chain`` from the validated bytes (via a private temporary directory), so
    what is loaded is exactly what was checked even if the files change meanwhile."""
    with tempfile.TemporaryDirectory(prefix="meshlib-svid-") as tmp:
        cert_file = Path(tmp, "cert.pem")
        key_file = Path(tmp, "key.pem")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(material.key_pem)
        cert_file.write_bytes(material.chain_pem)
        try:
            ctx.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as exc:
            raise TLSConfigError(f"TLS refused the SVID pair: {exc.reason or exc}") from exc
