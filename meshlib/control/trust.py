"""A workload's trust bundle and CRLs from the registry: :class:`BundleWatcher` follows
``GET /v1/ca/bundle`` and writes ``bundle.pem`` and ``crl.pem`` into the SVID directory, where
the workload's :class:`~meshlib.identity.rotation.RotationWatcher` picks them up as it picks up
files an operator copies (sequence-checked bundle rotation, CRL checking).

So ``meshctl ca rotate`` / ``meshctl ca revoke`` on the registry host reach every running
workload: the registry polls its CA dir every second, the held query answers at once, the
files are written, and the rotation watcher's next polls (1 s, settled over one more) reload
them. What is written is decided by :func:`plan_update` (pure, over the files' bytes): a bundle
only when its sequence is higher than the one on disk, CRLs only when none is older than the
one on disk from the same root, so a registry that is behind (a restored backup, a stale
replica) can never roll trust back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509

from meshlib.control.discovery import DEFAULT_WAIT, Pacing, SourceUnavailable, WatchRules
from meshlib.control.loop import LoopThread
from meshlib.control.wire import BundleAnswer
from meshlib.identity.bundle import BundleError, TrustBundle
from meshlib.identity.ca import SVID_BUNDLE_FILE, CAError, write_atomic
from meshlib.identity.crl import CRL_FILE, parse_crls

__all__ = [
    "BundleNotServed",
    "BundleSource",
    "BundleWatcher",
    "TrustUpdate",
    "plan_update",
    "write_update",
]

log = logging.getLogger("meshlib.control.trust")


class BundleNotServed(Exception):
    """The registry distributes no trust bundle (it runs without a CA dir): nothing to follow."""


class BundleSource(Protocol):
    """``GET /v1/ca/bundle`` as a blocking query: ``index`` 0 answers at once, otherwise the
    source may hold up to ``wait`` seconds for a change (unless ``epoch`` is not the
    registry's). Raises :class:`~meshlib.control.discovery.SourceUnavailable` when the registry
    cannot answer, :class:`BundleNotServed` when it serves no bundle."""

    async def bundle(self, *, index: int, wait: float, epoch: str = "") -> BundleAnswer: ...


@dataclass(frozen=True)
class TrustUpdate:
    """What to write for one answer: the files' new bytes (None: leave the file as it is) and
    why something the registry offered was not taken."""

    crls: bytes | None = None
    bundle: bytes | None = None
    refused: str | None = None


def _crl_key(crl: x509.CertificateRevocationList) -> tuple[bytes, bytes]:
    """A CRL's issuer: its name and authority key identifier (roots of a rotation differ)."""
    try:
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ident = aki.key_identifier or b""
    except x509.ExtensionNotFound:
        ident = b""
    return crl.issuer.public_bytes(), ident


def plan_update(
    answer: BundleAnswer, disk_bundle: bytes | None, disk_crls: bytes | None, where: str
) -> TrustUpdate:
    """What to write into the SVID dir ``where`` given the registry's ``answer`` and the bytes
    of its ``bundle.pem`` and ``crl.pem`` (None: missing).

    * The bundle is written only when its sequence is higher than the file's (a missing or
      unreadable file counts as lower than any). A lower one is refused, and then nothing of
      the answer is written: it comes from a registry that is behind.
    * The CRLs are written when they differ from the file and none is older (``lastUpdate``)
      than the file's CRL from the same root. An answer without CRLs never removes the file
      (removing it would not turn revocation off anyway: the reload refuses that)."""
    try:
        offered = TrustBundle.parse(answer.bundle.encode(), "the registry's bundle")
    except BundleError as exc:
        return TrustUpdate(refused=f"the registry's bundle was not written: {exc.reason}")
    held = -1
    if disk_bundle is not None:
        try:
            held = TrustBundle.parse(disk_bundle, where).sequence
        except BundleError:
            held = -1  # a damaged file is replaced by any good bundle
    if offered.sequence < held:
        return TrustUpdate(
            refused=f"the registry's bundle has sequence {offered.sequence}, lower than "
            f"{held} in {where}: not written (a registry that is behind must not roll trust "
            "back), nor its CRLs"
        )
    bundle = answer.bundle.encode() if offered.sequence > held else None
    crls, refused = _plan_crls(answer.crls.encode(), disk_crls, where)
    return TrustUpdate(crls, bundle, refused)


def _plan_crls(offered: bytes, disk: bytes | None, where: str) -> tuple[bytes | None, str | None]:
    if not offered.strip() or offered == disk:
        return None, None
    try:
        new = parse_crls(offered, "the registry's CRLs")
    except CAError as exc:
        return None, f"the registry's CRLs were not written: {exc.reason}"
    if disk is not None:
        try:
            old = parse_crls(disk, where)
        except CAError:
            old = ()  # a damaged file is replaced
        newest: dict[tuple[bytes, bytes], x509.CertificateRevocationList] = {}
        for crl in old:
            key = _crl_key(crl)
            if key not in newest or crl.last_update_utc > newest[key].last_update_utc:
                newest[key] = crl
        for crl in new:
            mine = newest.get(_crl_key(crl))
            if mine is not None and crl.last_update_utc < mine.last_update_utc:
                return None, (
                    f"the registry's CRL from {crl.issuer.rfc4514_string()} was updated "
                    f"{crl.last_update_utc.isoformat()}, before the one in {where} "
                    f"({mine.last_update_utc.isoformat()}): not written (it could un-revoke)"
                )
    return offered, None


class BundleWatcher:
    """Follows ``GET /v1/ca/bundle`` from ``source`` and writes ``svid_dir``'s ``bundle.pem``
    and ``crl.pem`` (see :func:`plan_update`), paced by discovery's
    :class:`~meshlib.control.discovery.WatchRules` (token bucket, full-jitter back-off, epoch).

    It runs as one task on ``loop`` (a :class:`~meshlib.control.loop.LoopThread` shared with
    the other client parts; without one it starts its own). :attr:`answers`, :attr:`writes`,
    :attr:`refused` and :attr:`sequence` say what it did (tests wait on them)."""

    def __init__(
        self,
        source: BundleSource,
        svid_dir: str | Path,
        *,
        loop: LoopThread | None = None,
        wait: float = DEFAULT_WAIT,
        pacing: Pacing | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.source = source
        self.directory = Path(svid_dir)
        self._owns_loop = loop is None
        self._loop = loop or LoopThread("meshlib-trust")
        self._wait = wait
        self._rules = WatchRules(clock, rng or random.Random(), pacing=pacing)
        self._future: concurrent.futures.Future[None] | None = None
        #: Answers received, files written, the last refusal (None once one is taken again).
        self.answers = 0
        self.writes = 0
        self.refused: str | None = None
        #: The bundle sequence of the last answer, and whether the registry serves bundles.
        self.sequence: int | None = None
        self.served = True

    # -- lifetime -----------------------------------------------------------------------------

    def start(self) -> BundleWatcher:
        if self._future is None:
            self._loop.start()
            self._future = self._loop.submit(self.run())
        return self

    def stop(self) -> None:
        if self._future is not None:
            self._future.cancel()
        if self._owns_loop:
            self._loop.stop()

    @property
    def running(self) -> bool:
        return self._future is not None and not self._future.done()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """The watch loop (until cancelled, or until the registry says it serves no bundle)."""
        rules = self._rules
        await asyncio.sleep(rules.first_delay())
        first = True
        while True:
            await asyncio.sleep(rules.take_token())
            # no hold after a failure: a registry back from an outage answers at once
            wait = 0.0 if rules.failures else self._wait
            try:
                answer = await self.source.bundle(index=rules.index, wait=wait, epoch=rules.epoch)
            except BundleNotServed as exc:
                self.served = False
                log.info("trust: %s; %s keeps the files it has", exc, self.directory)
                return
            except Exception as exc:
                retry = exc.retry_after if isinstance(exc, SourceUnavailable) else None
                delay = rules.failed(retry)
                log.warning("trust: bundle watch failed (%s); retry in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            self.answers += 1
            if rules.answered(answer.index, answer.epoch) or first:
                first = False
                self.apply(answer)

    def apply(self, answer: BundleAnswer) -> TrustUpdate:
        """Write what :func:`plan_update` says for ``answer``; never raises (a failed write is
        logged and retried with the next change)."""
        self.sequence = answer.sequence
        update, written = write_update(self.directory, answer)
        if update.refused is not None and update.refused != self.refused:
            log.warning("trust: %s", update.refused)
        self.refused = update.refused
        self.writes += written
        return update


def write_update(directory: Path, answer: BundleAnswer) -> tuple[TrustUpdate, int]:
    """Write what :func:`plan_update` says for ``answer`` into the SVID dir ``directory``:
    the update and how many files were written. Never raises (a failed write is logged; the
    caller retries with the next change). The workloads' :class:`BundleWatcher` and the
    registry's own CA poll (its server's SVID dir) both write through here, so neither can
    roll trust back."""
    bundle_path = directory / SVID_BUNDLE_FILE
    crl_path = directory / CRL_FILE
    update = plan_update(answer, _read(bundle_path), _read(crl_path), str(directory))
    written = 0
    try:
        # CRLs first: a bundle adding a root is refused by the reload until that root has
        # a CRL in crl.pem (checking fails closed), a CRL for a root not yet trusted is not.
        if update.crls is not None:
            write_atomic(crl_path, update.crls, mode=0o644)
            written += 1
        if update.bundle is not None:
            write_atomic(bundle_path, update.bundle, mode=0o644)
            written += 1
    except OSError as exc:
        log.error("trust: cannot write into %s: %s", directory, exc)
        return update, written
    if written:
        log.info(
            "trust: wrote %s into %s (bundle sequence %d, registry index %d)",
            " and ".join(
                name
                for name, data in ((CRL_FILE, update.crls), (SVID_BUNDLE_FILE, update.bundle))
                if data is not None
            ),
            directory,
            answer.sequence,
            answer.index,
        )
    return update, written


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
