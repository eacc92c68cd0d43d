"""TLS material for a workload: its X.509 SVID and trust bundle, loaded from files, as
``ssl.SSLContext`` objects, reloadable without ever breaking a live context.

:class:`SVIDSource` reads the ``meshctl ca issue --out`` layout (``cert.pem`` chain,
``key.pem``, ``bundle.pem``, which may hold several roots, and optionally ``crl.pem``).
:meth:`SVIDSource.reload` reads the files again and validates them in memory *before* touching
anything live:

1. ``cert.pem`` parses and ``key.pem`` is an unencrypted EC key that matches its leaf;
2. ``bundle.pem``'s sequence (:mod:`meshlib.identity.bundle`) is not lower than the live one; a
   lower one is ignored (logged, counted in :attr:`SVIDSource.stale_bundles`) and the live
   roots are kept, while the rest of the reload goes on;
3. the chain is a valid SVID for the bundle (:func:`~meshlib.identity.svid.verify_svid`) in the
   expected trust domain. A bundle that no longer holds the root this workload's leaf chains
   to is refused with that reason (root rotation pre-flight, SEC-7): re-issue the leaf first;
4. its SPIFFE ID is the one already served (unless ``allow_identity_change``);
5. with ``crl.pem``: every CRL parses and every root of the bundle has one (checking fails
   closed, so a root without a CRL would refuse all its peers). Once CRL checking is on, a
   reload without ``crl.pem`` is refused: removing the file cannot turn revocation off.

Only then is the new pair loaded (``load_cert_chain``) into every context the source built, so
new connections present it and established ones keep theirs. A failed reload leaves every
context as it was, raises, and keeps its reason in :attr:`SVIDSource.last_error`.

Roots are only ever *added* to a live context (OpenSSL cannot forget one); the in-memory
:attr:`SVIDSource.bundle` does follow removals, and the server's SPIFFE re-check
(:mod:`meshlib.inbound.serving`) verifies peers against it, so a removed root stops authenticating
peers at the next connection. CRLs likewise are added (OpenSSL uses the newest per issuer, and
the CA makes each one newer than the last) and the re-check uses :attr:`SVIDSource.crls`.
With CRLs, contexts verify with ``VERIFY_CRL_CHECK_LEAF``: the peer's leaf must not be revoked
and its issuer must have a CRL. Connections established before a revocation are not closed;
they last until either side closes them (keep-alive timeout, pool expiry).
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
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshlib.identity.bundle import load_bundle, root_label
from meshlib.identity.ca import (
    SVID_BUNDLE_FILE,
    SVID_CERT_FILE,
    SVID_KEY_FILE,
    CAError,
    load_certificates,
)
from meshlib.identity.crl import CRL_FILE, crls_pem, issued_by, load_crls
from meshlib.identity.spiffe import IdentityError, SpiffeID
from meshlib.identity.svid import SVIDError, verify_svid

__all__ = [
    "SVIDMaterial",
    "SVIDSource",
    "TLSConfigError",
    "load_cert_chain_bytes",
    "peer_chain",
]

log = logging.getLogger("meshlib.identity")


class TLSConfigError(IdentityError):
    """The SVID files could not be turned into TLS contexts (unreadable, mismatched, ...)."""


@dataclass(frozen=True)
class SVIDMaterial:
    """One validated SVID: its chain (leaf first), key bytes (PEM) and trust bundle."""

    spiffe_id: SpiffeID
    chain: tuple[x509.Certificate, ...]
    key_pem: bytes = field(repr=False)  # never in reprs, logs or exceptions
    bundle: tuple[x509.Certificate, ...]
    bundle_sequence: int = 0
    #: The CRLs of ``crl.pem``; empty: no revocation checking.
    crls: tuple[x509.CertificateRevocationList, ...] = ()

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
    (``meshlib.inbound.serving.Server.reload_svid`` does).
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
        #: Bundle files ignored because their sequence was lower than the live one.
        self.stale_bundles = 0
        self._current = self._read(trust_domain, None)
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

    @property
    def bundle_sequence(self) -> int:
        return self._current.bundle_sequence

    @property
    def crls(self) -> tuple[x509.CertificateRevocationList, ...] | None:
        """The live CRLs, for :func:`~meshlib.identity.svid.verify_svid`'s ``crls``; ``None``
        when revocation is not checked (no ``crl.pem``)."""
        return self._current.crls or None

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
        return _as_mesh_client(self._base(ssl.PROTOCOL_TLS_CLIENT))

    def current_client_context(self) -> ssl.SSLContext:
        """A client context for the pair loaded *now*, replaced (never modified) by
        :meth:`reload`: safe for handshakes in other threads while a reload runs, where
        loading a pair into a shared context has a window with the new certificate and no
        key. Mesh client transports take this one for each new connection."""
        ctx = self._fresh_client
        if ctx is None:
            with self._lock:
                material = self._current
            ctx = _as_mesh_client(self._build(ssl.PROTOCOL_TLS_CLIENT, material, register=False))
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
        if material.crls:
            _load_crls(ctx, material.crls)
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
            new = self._read(self.trust_domain, self._current)
            if new.spiffe_id != self._current.spiffe_id and not self.allow_identity_change:
                raise TLSConfigError(
                    f"new SVID is for {new.spiffe_id}, this workload is "
                    f"{self._current.spiffe_id}; refusing an identity change"
                )
        except IdentityError as exc:
            self.last_error = exc.reason
            raise
        old = self._current
        if (new.chain, new.bundle, new.bundle_sequence, new.crls) == (
            old.chain,
            old.bundle,
            old.bundle_sequence,
            old.crls,
        ):
            self.last_error = None
            return False
        with self._lock:
            old_roots = set(old.bundle)
            added = [c for c in new.bundle if c not in old_roots]
            added_pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in added)
            new_crls = [c for c in new.crls if c not in old.crls]  # CRLs are unhashable
            for ctx in list(self._contexts):
                _load_pair(ctx, new)  # validated above: cannot fail on a key mismatch
                if added_pem:
                    ctx.load_verify_locations(cadata=added_pem)
                if new_crls:
                    _load_crls(ctx, new_crls)
            self._current = new
            self._fresh_client = None
        self.last_error = None
        return True

    def _read(self, trust_domain: str | None, live: SVIDMaterial | None) -> SVIDMaterial:
        base = self.directory
        cert_path, key_path = base / SVID_CERT_FILE, base / SVID_KEY_FILE
        bundle_path = base / SVID_BUNDLE_FILE
        chain = tuple(load_certificates(cert_path))
        published = load_bundle(bundle_path)
        bundle, sequence = published.roots, published.sequence
        if live is not None and sequence < live.bundle_sequence:
            self.stale_bundles += 1
            log.warning(
                "%s has bundle sequence %d, lower than the live %d: ignored, keeping the live "
                "roots",
                bundle_path,
                sequence,
                live.bundle_sequence,
            )
            bundle, sequence = live.bundle, live.bundle_sequence
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
            dropped = _dropped_root(chain, bundle, () if live is None else live.bundle)
            if dropped is not None:
                raise TLSConfigError(
                    f"{bundle_path} (sequence {sequence}) refused: this workload's leaf "
                    f"{cert_path} is still chained to {root_label(dropped)} which the new bundle "
                    "drops; re-issue the leaf under a root of the new bundle first"
                ) from exc
            raise SVIDError(f"{cert_path}: {exc.reason}") from exc
        crls = self._read_crls(bundle, live)
        return SVIDMaterial(spiffe_id, chain, key_pem, bundle, sequence, crls)

    def _read_crls(
        self, bundle: tuple[x509.Certificate, ...], live: SVIDMaterial | None
    ) -> tuple[x509.CertificateRevocationList, ...]:
        crl_path = self.directory / CRL_FILE
        if not crl_path.exists():
            if live is not None and live.crls:
                raise TLSConfigError(
                    f"{crl_path} is gone but CRL checking is on; removing the file does not "
                    "turn revocation off (restart the workload to do that)"
                )
            return ()
        crls = load_crls(crl_path)
        for root in bundle:
            if not any(issued_by(crl, root) for crl in crls):
                raise TLSConfigError(
                    f"{crl_path} has no CRL from {root_label(root)}, a root of the bundle; "
                    "CRL checking fails closed, so every peer chained to it would be refused"
                )
        return crls


def _as_mesh_client(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """No hostname check (a SPIFFE ID is a URI SAN; the caller verifies it), chain required."""
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _dropped_root(
    chain: tuple[x509.Certificate, ...],
    bundle: tuple[x509.Certificate, ...],
    live_bundle: tuple[x509.Certificate, ...],
) -> x509.Certificate | None:
    """The live root that ``chain`` ends at if the new ``bundle`` no longer holds it."""
    top = chain[-1]
    for root in live_bundle:
        if root not in bundle:
            try:
                top.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return root
    return None


def _load_crls(
    ctx: ssl.SSLContext,
    crls: list[x509.CertificateRevocationList] | tuple[x509.CertificateRevocationList, ...],
) -> None:
    """Add CRLs to ``ctx``'s store and check the peer's leaf against them. ``cadata`` takes
    only certificates, so they go through a private temporary file."""
    with tempfile.TemporaryDirectory(prefix="meshlib-crl-") as tmp:
        crl_file = Path(tmp, CRL_FILE)
        crl_file.write_bytes(crls_pem(crls))
        try:
            ctx.load_verify_locations(cafile=crl_file)
        except ssl.SSLError as exc:
            raise TLSConfigError(f"TLS refused the CRLs: {exc.reason or exc}") from exc
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def load_cert_chain_bytes(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """``ctx.load_cert_chain`` from PEM bytes: ssl reads files only, so they go through a private
    temporary directory (the key file created 0600, both removed with it). What is loaded is
    exactly the bytes given, even if the files they came from change meanwhile. Raises
    ``ssl.SSLError`` as ``load_cert_chain`` does (a key that does not match, ...)."""
    with tempfile.TemporaryDirectory(prefix="meshlib-tls-") as tmp:
        cert_file = Path(tmp, "cert.pem")
        key_file = Path(tmp, "key.pem")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        cert_file.write_bytes(chain_pem)
        ctx.load_cert_chain(cert_file, key_file)


def _load_pair(ctx: ssl.SSLContext, material: SVIDMaterial) -> None:
    """The validated SVID pair into ``ctx`` (what is loaded is exactly what was checked)."""
    try:
        load_cert_chain_bytes(ctx, material.chain_pem, material.key_pem)
    except ssl.SSLError as exc:
        raise TLSConfigError(f"TLS refused the SVID pair: {exc.reason or exc}") from exc


def peer_chain(ssl_object: ssl.SSLObject, leaf_der: bytes) -> list[bytes]:
    """The verified chain of a TLS peer (leaf first, ending at the trust anchor) where Python
    exposes it (public on 3.13+, private ``_sslobj`` before), else just the leaf: what both
    sides of mutual TLS re-check as a SPIFFE SVID after OpenSSL's handshake."""
    getter = getattr(ssl_object, "get_verified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_verified_chain", None)
    if getter is None:
        return [leaf_der]
    try:
        chain = getter()
    except (AttributeError, ValueError):  # pragma: no cover - depends on the interpreter
        return [leaf_der]
    out: list[bytes] = []
    for cert in chain or ():
        if isinstance(cert, bytes):
            out.append(cert)
        else:  # 3.10-3.12: _ssl.Certificate
            out.append(cert.public_bytes(2))  # 2 = _ssl.ENCODING_DER
    return out if out and out[0] == leaf_der else [leaf_der]
