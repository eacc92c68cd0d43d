"""SVID rotation: watch the SVID directory and swap a renewed pair in, without dropping calls.

meshlib does not hold the CA key: whoever issues certificates (``meshctl ca issue --out DIR``,
or an agent) replaces ``cert.pem``, ``key.pem``, ``bundle.pem`` and ``crl.pem`` in the directory
(a new bundle during a root rotation, a new CRL after a revocation, are picked up the same way,
so either takes effect within about two poll intervals). A
:class:`RotationWatcher` polls their stat (mtime, size, inode); once a change has settled for
one poll interval it calls the reload function (:meth:`SVIDSource.reload`, or
:meth:`meshlib.inbound.serving.Server.reload_svid`, which runs it on the server's event loop). The
source validates the new pair before touching anything live, so a refused pair (mismatched key,
wrong trust domain, ...) keeps the old one served; the watcher records the error and retries at the
next change of the files.

Renewal is expected at ``not_before + lifetime x (0.5 +/- 0.1)`` (:func:`renewal_time`; the
jitter spreads workloads apart). Past that time with no new files, the watcher logs a warning
once per ``warn_interval``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from meshlib.identity.ca import SVID_BUNDLE_FILE, SVID_CERT_FILE, SVID_KEY_FILE
from meshlib.identity.crl import CRL_FILE
from meshlib.identity.tls import SVIDMaterial, SVIDSource

__all__ = ["RENEW_FRACTION", "RENEW_JITTER", "RotationStatus", "RotationWatcher", "renewal_time"]

log = logging.getLogger("meshlib.identity.rotation")

#: Renew at this fraction of the certificate's lifetime ...
RENEW_FRACTION = 0.5
#: ... plus or minus up to this fraction of the lifetime (uniform).
RENEW_JITTER = 0.1

_Stat = tuple[tuple[int, int, int] | None, ...]


def renewal_time(
    not_before: float,
    not_after: float,
    rng: random.Random,
    *,
    fraction: float = RENEW_FRACTION,
    jitter: float = RENEW_JITTER,
) -> float:
    """When a certificate valid from ``not_before`` to ``not_after`` (Unix seconds) should be
    renewed: ``not_before + lifetime x (fraction + uniform(-jitter, +jitter))``."""
    if not 0.0 <= jitter <= fraction <= 1.0 - jitter:
        raise ValueError(f"need 0 <= jitter <= fraction <= 1 - jitter, got {fraction}/{jitter}")
    lifetime = max(0.0, not_after - not_before)
    return not_before + lifetime * (fraction + rng.uniform(-jitter, jitter))


@dataclass(frozen=True)
class RotationStatus:
    """What a :class:`RotationWatcher` knows (timestamps are wall-clock Unix seconds)."""

    identity: str
    serial: int
    not_before: float
    expires_at: float
    renew_at: float
    last_reload: float | None = None
    last_error: str | None = None
    reloads: int = 0
    failures: int = 0

    @property
    def ok(self) -> bool:
        return self.last_error is None


class RotationWatcher:
    """Polls ``source.directory`` in a daemon thread; reloads when the files change.

    ``reload`` (default ``source.reload``) does the swap and returns ``True`` if a new pair is
    now served; ``on_reload`` is called with the material served at start and after each swap.
    ``clock`` is the wall clock (certificate validity), ``monotonic`` paces the warnings.
    """

    def __init__(
        self,
        source: SVIDSource,
        *,
        reload: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        poll_interval: float = 1.0,
        warn_interval: float = 60.0,
        on_reload: Callable[[SVIDMaterial], None] | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        self.source = source
        self._reload = reload or source.reload
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self.poll_interval = poll_interval
        self.warn_interval = warn_interval
        self._on_reload = on_reload
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_warning: float | None = None
        self._status = self._status_for(source.material)
        self._notify(source.material)

    # -- status ---------------------------------------------------------------------------

    @property
    def status(self) -> RotationStatus:
        return self._status

    def _status_for(
        self, material: SVIDMaterial, previous: RotationStatus | None = None
    ) -> RotationStatus:
        cert = material.certificate
        not_before = cert.not_valid_before_utc.timestamp()
        not_after = cert.not_valid_after_utc.timestamp()
        return RotationStatus(
            identity=str(material.spiffe_id),
            serial=cert.serial_number,
            not_before=not_before,
            expires_at=not_after,
            renew_at=renewal_time(not_before, not_after, self._rng),
            last_reload=None if previous is None else previous.last_reload,
            reloads=0 if previous is None else previous.reloads,
            failures=0 if previous is None else previous.failures,
        )

    def _notify(self, material: SVIDMaterial) -> None:
        if self._on_reload is not None:
            try:
                self._on_reload(material)
            except Exception:  # a metrics hook must not stop rotation
                log.exception("SVID on_reload callback failed")

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> RotationWatcher:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"meshlib-svid-{self.source.directory.name}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------

    def _stat(self) -> _Stat:
        out: list[tuple[int, int, int] | None] = []
        for name in (SVID_CERT_FILE, SVID_KEY_FILE, SVID_BUNDLE_FILE, CRL_FILE):
            try:
                st = os.stat(Path(self.source.directory, name))
            except OSError:
                out.append(None)
            else:
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def _run(self) -> None:
        seen: _Stat | None = None  # the first poll re-checks the files once
        while not self._stop.wait(self.poll_interval):
            current = self._stat()
            if current != seen:
                if self._stop.wait(self.poll_interval):
                    return
                if self._stat() != current:
                    continue  # still being written: wait for it to settle
                seen = current
                self.check()
            self._warn_if_overdue()

    def check(self) -> bool:
        """Reload now; ``True`` if a new pair is served. Never raises: a refused pair is
        recorded in :attr:`status` (``last_error``) and the old one stays live."""
        try:
            changed = self._reload()
        except Exception as exc:
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            prev = self._status
            self._status = _replace(prev, last_error=reason, failures=prev.failures + 1)
            log.warning("SVID in %s refused, keeping the current one: %s", self.directory, reason)
            return False
        prev = self._status
        if changed:
            material = self.source.material
            status = self._status_for(material, prev)
            self._status = _replace(status, last_reload=self._clock(), reloads=prev.reloads + 1)
            self._last_warning = None
            log.info(
                "SVID rotated: %s serial %x, expires %s",
                status.identity,
                status.serial,
                _iso(status.expires_at),
            )
            self._notify(material)
        elif prev.last_error is not None:
            self._status = _replace(prev, last_error=None)
        return changed

    def _warn_if_overdue(self) -> None:
        status = self._status
        if self._clock() < status.renew_at:
            return
        now = self._monotonic()
        if self._last_warning is not None and now - self._last_warning < self.warn_interval:
            return
        self._last_warning = now
        log.warning(
            "certificate expires at %s, no renewal found in %s",
            _iso(status.expires_at),
            self.directory,
        )

    @property
    def directory(self) -> Path:
        return self.source.directory


def _replace(status: RotationStatus, **changes: object) -> RotationStatus:
    from dataclasses import replace

    return replace(status, **changes)  # type: ignore[arg-type]


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")
