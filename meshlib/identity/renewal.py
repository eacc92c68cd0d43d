"""SVID renewal: ask an issuer for a new SVID at half-life, retry while it is unavailable.

The :class:`~meshlib.identity.rotation.RotationWatcher` swaps in whatever pair appears in the
SVID directory; a :class:`Renewer` is what puts a fresh pair there. At the renewal time
(:func:`~meshlib.identity.rotation.renewal_time`: 50 % ± 10 % of the lifetime of the SVID being
served) it asks an :class:`Issuer` for a new SVID for the same identity and writes it into the
directory (each file replaced atomically, the key 0600), then calls ``on_renewed`` (the mesh
uses it to reload at once instead of at the watcher's next poll).

When the issuer fails (the CA is down, its key unreadable, ...) the renewer retries with
exponential back-off and jitter, bounded by ``max_delay`` (:func:`backoff_delay`), so a CA that
comes back is used within one retry interval. Meanwhile (RELIABILITY.md FAULT-16):

* ``mesh_cert_renewal_failures_total{identity}`` counts failed attempts;
* ``mesh_cert_renewal_overdue{identity}`` turns 1 once 80 % of the lifetime has passed without
  a renewal (the alert condition; :data:`OVERDUE_FRACTION`), and back to 0 after one;
* the served SVID stays in use until it expires; after that, handshakes fail (peers verify
  the dates) and calls fail closed. Nothing here ever turns TLS off: whether a call uses TLS
  is the policy's ``mtls`` mode, never the state of the certificate.

The schedule is pure given the clock and the RNG (:meth:`Renewer.step` does one round and
returns how long to wait), so tests drive it with a fake clock and a seeded RNG; :meth:`start`
runs it in a daemon thread. A registry-backed issuer (CSR over mTLS) is not written yet;
:class:`LocalIssuer` signs with a CA directory (``meshctl ca init --dir``) on the same host.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from meshlib.identity.ca import DEFAULT_SVID_TTL, X509SVID, CertificateAuthority
from meshlib.identity.rotation import renewal_time
from meshlib.identity.spiffe import SpiffeID

if TYPE_CHECKING:
    from cryptography import x509

    from meshlib.identity.tls import SVIDSource

__all__ = [
    "OVERDUE_FRACTION",
    "Issuer",
    "LocalIssuer",
    "RenewalStatus",
    "Renewer",
    "backoff_delay",
    "overdue_time",
]

log = logging.getLogger("meshlib.identity.renewal")

#: Past this fraction of its lifetime, an SVID not yet renewed raises the overdue alert.
OVERDUE_FRACTION = 0.8


class RenewalMetrics(Protocol):
    """Where renewal reports trouble (:class:`meshlib.observe.metrics.MeshMetrics`)."""

    def renewal_failed(self, identity: str) -> None: ...

    def set_renewal_overdue(self, identity: str, overdue: bool) -> None: ...


class Issuer(Protocol):
    """Something that signs SVIDs: a CA on disk now, the registry's CA later."""

    def issue(self, spiffe_id: SpiffeID) -> X509SVID:
        """A new SVID (fresh key) for ``spiffe_id``; raises if it cannot issue one now."""
        ...


class LocalIssuer:
    """Issues from the CA in ``ca_dir`` (``ca.pem``, ``ca-key.pem``), read at every call so a
    CA that is unavailable (directory gone, key unreadable or too widely readable) fails that
    attempt only, and a CA that returns is used at the next one."""

    def __init__(
        self,
        ca_dir: str | os.PathLike[str],
        *,
        ttl: dt.timedelta = DEFAULT_SVID_TTL,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        self.ca_dir = Path(ca_dir)
        self.ttl = ttl
        self._clock = clock  # the CA's clock (tests); None: now

    def issue(self, spiffe_id: SpiffeID) -> X509SVID:
        ca = CertificateAuthority.load(self.ca_dir)
        if self._clock is None:
            return ca.issue(spiffe_id, ttl=self.ttl)
        return ca.issue(spiffe_id, ttl=self.ttl, clock=self._clock)

    def __repr__(self) -> str:
        return f"LocalIssuer({str(self.ca_dir)!r}, ttl={self.ttl})"


def backoff_delay(
    failures: int, rng: random.Random, *, base: float = 1.0, cap: float = 60.0
) -> float:
    """Seconds to wait after ``failures`` consecutive failures (>= 1): exponential from
    ``base``, capped at ``cap``, with "equal jitter" (a uniform draw in the upper half), so
    retries spread out yet never wait longer than ``cap`` or shorter than ``base / 2``."""
    if failures < 1:
        raise ValueError(f"failures must be >= 1, got {failures}")
    ceiling = min(cap, base * 2.0 ** min(failures - 1, 62))
    return ceiling / 2.0 + rng.uniform(0.0, ceiling / 2.0)


def overdue_time(not_before: float, not_after: float) -> float:
    """When an SVID valid from ``not_before`` to ``not_after`` is overdue for renewal."""
    return not_before + max(0.0, not_after - not_before) * OVERDUE_FRACTION


class RenewalStatus:
    """What a :class:`Renewer` knows (wall-clock Unix seconds), for debug pages and tests."""

    __slots__ = ("expires_at", "failures", "last_error", "overdue", "renew_at", "renewals")

    def __init__(self) -> None:
        self.renew_at = 0.0
        self.expires_at = 0.0
        self.overdue = False
        self.failures = 0  # consecutive failed attempts (0 after a renewal)
        self.renewals = 0
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return (
            f"RenewalStatus(renew_at={self.renew_at:.3f}, expires_at={self.expires_at:.3f}, "
            f"overdue={self.overdue}, failures={self.failures}, renewals={self.renewals}, "
            f"last_error={self.last_error!r})"
        )


class Renewer:
    """Renews ``source``'s SVID from ``issuer`` into ``source.directory``.

    ``clock`` is the wall clock (certificate validity); ``base_delay``/``max_delay`` bound the
    retry back-off. ``on_renewed`` is called with each SVID written (after the files are in
    place); an exception from it counts as a failed attempt, so a pair that does not load is
    retried rather than forgotten.
    """

    def __init__(
        self,
        source: SVIDSource,
        issuer: Issuer,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        metrics: RenewalMetrics | None = None,
        on_renewed: Callable[[X509SVID], object] | None = None,
    ) -> None:
        if not 0 < base_delay <= max_delay:
            raise ValueError(f"need 0 < base_delay <= max_delay, got {base_delay}/{max_delay}")
        self.source = source
        self.issuer = issuer
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._clock = clock
        self._rng = rng or random.Random()
        self._metrics = metrics
        self._on_renewed = on_renewed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.status = RenewalStatus()
        self._cert: x509.Certificate | None = None  # the certificate the schedule is for
        self._overdue_at = 0.0

    # -- one round ------------------------------------------------------------------------

    def step(self) -> float:
        """Renew if it is time (once); return the seconds until the next round is due."""
        now = self._clock()
        self._schedule()
        status = self.status
        if now < status.renew_at:
            self._set_overdue(False)
            return status.renew_at - now
        try:
            svid = self.issuer.issue(self.source.spiffe_id)
            svid.save(self.source.directory)
            if self._on_renewed is not None:
                self._on_renewed(svid)
        except Exception as exc:
            return self._failed(exc, now)
        status.failures = 0
        status.renewals += 1
        status.last_error = None
        self._plan(svid.certificate)
        self._set_overdue(False)
        log.info("SVID renewed for %s, valid until %s", svid.spiffe_id, _iso(status.expires_at))
        return max(0.0, status.renew_at - now)

    def _schedule(self) -> None:
        """Plan for the newest certificate known: the one served, or one issued here that
        the source has not loaded yet (never renew twice for one half-life)."""
        served = self.source.material.certificate
        known = self._cert
        if known is not None and known.not_valid_after_utc >= served.not_valid_after_utc:
            return
        self._plan(served)

    def _plan(self, cert: x509.Certificate) -> None:
        self._cert = cert
        not_before = cert.not_valid_before_utc.timestamp()
        not_after = cert.not_valid_after_utc.timestamp()
        self.status.renew_at = renewal_time(not_before, not_after, self._rng)
        self.status.expires_at = not_after
        self._overdue_at = overdue_time(not_before, not_after)

    def _failed(self, exc: Exception, now: float) -> float:
        status = self.status
        status.failures += 1
        status.last_error = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        identity = str(self.source.spiffe_id)
        if self._metrics is not None:
            self._metrics.renewal_failed(identity)
        self._set_overdue(now >= self._overdue_at)
        delay = backoff_delay(status.failures, self._rng, base=self.base_delay, cap=self.max_delay)
        expired = now >= status.expires_at
        log.log(
            logging.ERROR if status.overdue or expired else logging.WARNING,
            "SVID renewal for %s failed (attempt %d%s), retrying in %.1fs: %s",
            identity,
            status.failures,
            ", certificate EXPIRED: mesh calls fail" if expired else "",
            delay,
            status.last_error,
        )
        return delay

    def _set_overdue(self, overdue: bool) -> None:
        self.status.overdue = overdue
        if self._metrics is not None:
            self._metrics.set_renewal_overdue(str(self.source.spiffe_id), overdue)

    # -- lifetime -------------------------------------------------------------------------

    def start(self) -> Renewer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"meshlib-renew-{self.source.directory.name}", daemon=True
            )
            self._thread.start()
        return self

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                delay = self.step()
            except Exception:  # the renewer must outlive a bug in one round
                log.exception("SVID renewal round failed unexpectedly")
                delay = self.max_delay
            # Re-check at least every max_delay: the overdue gauge and a clock jump.
            delay = min(delay, self.max_delay)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __repr__(self) -> str:
        return f"<Renewer {self.source.directory} from {self.issuer!r}: {self.status!r}>"


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")
