"""A CA directory over its lifetime: root rotation by overlap, published bundles with sequence
numbers, a record of issued leaves, and revocation lists.

Layout of ``DIR`` (``meshctl ca ...`` verbs map onto the methods of :class:`CADirectory`):

- ``ca.pem``, ``ca-key.pem``: the current root, the newest; ``issue`` signs with it;
- ``ca-previous.pem``, ``ca-previous-key.pem``: the root being rotated out (after ``rotate``);
- ``bundle.pem``: the published trust bundle, with its sequence line
  (:mod:`meshlib.identity.bundle`); ``issue`` copies it into every SVID directory;
- ``issued.jsonl``: one JSON line per issued leaf (serial, SPIFFE ID, issuing root's SKI,
  notAfter), so dropping a root can be refused while a live leaf still chains to it;
- ``crl.pem``: after the first ``revoke``, one CRL per root (:mod:`meshlib.identity.crl`);
  ``issue`` copies it too.

Root rotation (SEC-7), as in SPIFFE's bundle rotation example: ``rotate`` makes R2 and
publishes {R1, R2} with the next sequence; every leaf is re-issued under R2; ``drop_old``
publishes {R2} with the next sequence, refusing while ``issued.jsonl`` shows an unexpired leaf
whose latest issuance still chains to R1. One rotation at a time: ``rotate`` refuses while the
published bundle still holds the previous root.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshlib.identity.bundle import TrustBundle, load_bundle, root_label
from meshlib.identity.ca import (
    DEFAULT_SVID_TTL,
    ROOT_COMMON_NAME,
    SVID_BUNDLE_FILE,
    X509SVID,
    CAError,
    CertificateAuthority,
    LeafPublicKey,
    load_certificates,
    write_atomic,
)
from meshlib.identity.crl import CRL_FILE, crls_pem, issued_by, load_crls, sign_crl
from meshlib.identity.spiffe import SpiffeID

__all__ = ["ISSUED_FILE", "PREVIOUS_CERT_FILE", "PREVIOUS_KEY_FILE", "CADirectory", "IssuedLeaf"]

PREVIOUS_CERT_FILE = "ca-previous.pem"
PREVIOUS_KEY_FILE = "ca-previous-key.pem"
ISSUED_FILE = "issued.jsonl"

Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class IssuedLeaf:
    """One line of ``issued.jsonl``."""

    serial: int
    spiffe_id: str
    root_ski: str
    not_after: dt.datetime


class CADirectory:
    """The CA directory ``path`` (see the module docstring for its files)."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Clock = _utcnow) -> None:
        self.path = Path(path)
        self._clock = clock

    # -- reading --------------------------------------------------------------------------

    def current(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.path)

    def previous(self) -> CertificateAuthority | None:
        if not (self.path / PREVIOUS_CERT_FILE).exists():
            return None
        return CertificateAuthority.load(
            self.path, cert_file=PREVIOUS_CERT_FILE, key_file=PREVIOUS_KEY_FILE
        )

    def bundle(self) -> TrustBundle:
        """The published bundle; a directory from before bundles were published trusts its
        one root, unsequenced."""
        path = self.path / SVID_BUNDLE_FILE
        if path.exists():
            return load_bundle(path)
        return TrustBundle((self.current().certificate,), 0)

    def issued(self) -> list[IssuedLeaf]:
        path = self.path / ISSUED_FILE
        if not path.exists():
            return []
        out = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                raw = json.loads(line)
                out.append(
                    IssuedLeaf(
                        int(raw["serial"], 16),
                        str(raw["spiffe_id"]),
                        str(raw["root_ski"]),
                        dt.datetime.fromisoformat(raw["not_after"]),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise CAError(f"{path}:{number}: not an issued-leaf record") from exc
        return out

    def leaves_on(self, root: x509.Certificate) -> list[IssuedLeaf]:
        """Unexpired leaves whose latest issuance (per SPIFFE ID) chains to ``root``."""
        latest: dict[str, IssuedLeaf] = {}
        for leaf in self.issued():
            latest[leaf.spiffe_id] = leaf
        now = self._clock()
        ski = _ski(root)
        return [x for x in latest.values() if x.root_ski == ski and x.not_after > now]

    # -- the verbs ------------------------------------------------------------------------

    def init(self, trust_domain: str, *, force: bool = False) -> CertificateAuthority:
        """A new root and the bundle {root} with sequence 1."""
        ca = CertificateAuthority.create(trust_domain, clock=self._clock)
        ca.save(self.path, overwrite=force)
        for name in (PREVIOUS_CERT_FILE, PREVIOUS_KEY_FILE, CRL_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()  # they belonged to the root just replaced
        self._publish(TrustBundle((ca.certificate,), 1))
        return ca

    def rotate(self) -> tuple[CertificateAuthority, TrustBundle]:
        """Make a new root, keep the current one as previous, publish {old..., new}."""
        current, bundle = self.current(), self.bundle()
        previous = self.previous()
        if previous is not None and previous.certificate in bundle.roots:
            raise CAError(
                f"a rotation is in progress: {self.path / SVID_BUNDLE_FILE} still trusts "
                f"{root_label(previous.certificate)}; finish it with "
                f"'meshctl ca bundle --dir {self.path} --out FILE --drop-old'"
            )
        new = CertificateAuthority.create(
            current.trust_domain,
            clock=self._clock,
            common_name=f"{ROOT_COMMON_NAME} {secrets.token_hex(4)}",
        )
        current.save(
            self.path, overwrite=True, cert_file=PREVIOUS_CERT_FILE, key_file=PREVIOUS_KEY_FILE
        )
        new.save(self.path, overwrite=True)
        roots = tuple(r for r in bundle.roots if r != new.certificate)
        if current.certificate not in roots:
            roots += (current.certificate,)
        published = TrustBundle((*roots, new.certificate), bundle.sequence + 1)
        self._publish(published)
        if (self.path / CRL_FILE).exists():
            self._sign_crls({})  # the new root needs a CRL too, or its leaves fail closed
        return new, published

    def drop_old(self, *, force: bool = False) -> TrustBundle:
        """Publish the bundle without the previous root, with the next sequence."""
        previous, bundle = self.previous(), self.bundle()
        if previous is None or previous.certificate not in bundle.roots:
            raise CAError(
                f"nothing to drop: {self.path / SVID_BUNDLE_FILE} holds no previous root "
                f"(run 'meshctl ca rotate --dir {self.path}' first)"
            )
        left = self.leaves_on(previous.certificate)
        if left and not force:
            names = ", ".join(sorted(x.spiffe_id for x in left)[:5])
            more = f" and {len(left) - 5} more" if len(left) > 5 else ""
            raise CAError(
                f"{len(left)} leaf certificate(s) still chained to "
                f"{root_label(previous.certificate)} which the new bundle drops: {names}{more}; "
                "re-issue them with 'meshctl ca issue' (or pass --force)"
            )
        roots = tuple(r for r in bundle.roots if r != previous.certificate)
        published = TrustBundle(roots, bundle.sequence + 1)
        self._publish(published)
        return published

    def export_bundle(
        self, out: str | os.PathLike[str], *, drop_old: bool = False, force: bool = False
    ) -> TrustBundle:
        """Write the published bundle to ``out`` (after :meth:`drop_old` if asked)."""
        bundle = self.drop_old(force=force) if drop_old else self.bundle()
        try:
            write_atomic(Path(out), bundle.to_pem(), mode=0o644)
        except OSError as exc:
            raise CAError(f"cannot write {out}: {exc.strerror}") from exc
        return bundle

    def issue(
        self,
        spiffe_id: SpiffeID,
        *,
        out: str | os.PathLike[str] | None = None,
        ttl: dt.timedelta = DEFAULT_SVID_TTL,
    ) -> X509SVID:
        """An SVID from the current root carrying the published bundle; recorded in
        ``issued.jsonl``. With ``out``, saved there with a copy of ``crl.pem`` if any."""
        ca, bundle = self.current(), self.bundle()
        svid = ca.issue(spiffe_id, ttl=ttl, clock=self._clock)
        svid = replace(svid, bundle=bundle.roots, bundle_sequence=bundle.sequence)
        self.record(svid.certificate, svid.spiffe_id, ca)
        if out is not None:
            target = svid.save(out)
            crl = self.path / CRL_FILE
            if crl.exists():
                write_atomic(target / CRL_FILE, crl.read_bytes(), mode=0o644)
        return svid

    def sign(
        self,
        public_key: LeafPublicKey,
        spiffe_id: SpiffeID,
        *,
        ttl: dt.timedelta = DEFAULT_SVID_TTL,
        serial: int | None = None,
    ) -> tuple[x509.Certificate, TrustBundle]:
        """A leaf for a caller's key (a checked CSR's) from the current root, recorded in
        ``issued.jsonl`` as :meth:`issue` records its SVIDs; returned with the published
        bundle the caller should trust."""
        ca, bundle = self.current(), self.bundle()
        cert = ca.sign(public_key, spiffe_id, ttl=ttl, clock=self._clock, serial=serial)
        self.record(cert, spiffe_id, ca)
        return cert, bundle

    def revoke(self, cert_files: Sequence[str | os.PathLike[str]]) -> list[tuple[int, str]]:
        """Add each file's leaf to its issuing root's CRL and re-sign every root's CRL into
        ``crl.pem``; with no file, just re-sign (before the CRLs' nextUpdate).
        Returns (serial, issuing root label) for each certificate revoked."""
        roots = self._roots()
        now = self._clock()
        added: dict[int, list[tuple[int, dt.datetime]]] = {}
        revoked: list[tuple[int, str]] = []
        for file in cert_files:
            leaf = load_certificates(file)[0]
            for index, ca in enumerate(roots):
                if _signed_by(leaf, ca.certificate):
                    added.setdefault(index, []).append((leaf.serial_number, now))
                    revoked.append((leaf.serial_number, root_label(ca.certificate)))
                    break
            else:
                raise CAError(f"{file} was not issued by a root in {self.path}")
        self._sign_crls(added)
        return revoked

    # -- files ----------------------------------------------------------------------------

    def _roots(self) -> list[CertificateAuthority]:
        previous = self.previous()
        return [self.current(), *([] if previous is None else [previous])]

    def _publish(self, bundle: TrustBundle) -> None:
        write_atomic(self.path / SVID_BUNDLE_FILE, bundle.to_pem(), mode=0o644)

    def record(
        self, certificate: x509.Certificate, spiffe_id: SpiffeID, ca: CertificateAuthority
    ) -> None:
        """Append a leaf ``ca`` issued to ``issued.jsonl`` (what :meth:`drop_old` and
        ``meshctl ca revoke`` look up)."""
        line = {
            "serial": f"{certificate.serial_number:x}",
            "spiffe_id": str(spiffe_id),
            "root_ski": _ski(ca.certificate),
            "not_after": certificate.not_valid_after_utc.isoformat(),
        }
        with open(self.path / ISSUED_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")

    def _sign_crls(self, added: dict[int, list[tuple[int, dt.datetime]]]) -> None:
        path = self.path / CRL_FILE
        existing = load_crls(path) if path.exists() else ()
        now = self._clock()
        out = []
        for index, ca in enumerate(self._roots()):
            mine = [c for c in existing if issued_by(c, ca.certificate)]
            previous = max(mine, key=lambda c: c.last_update_utc) if mine else None
            entries = {r.serial_number: r.revocation_date_utc for r in previous or ()}
            for serial, when in added.get(index, []):
                entries.setdefault(serial, when)
            out.append(sign_crl(ca, sorted(entries.items()), previous=previous, now=now))
        write_atomic(path, crls_pem(out), mode=0o644)


def _ski(cert: x509.Certificate) -> str:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def _signed_by(leaf: x509.Certificate, root: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
