"""The access log: one line per outbound call and per inbound request on the ``meshlib.access``
logger, as JSON (``json.dumps`` of :meth:`CallEvent.as_dict`) or as readable text.

Why a writer thread: a logging handler may block (a full pipe, a slow disk, a network
handler), and the access log must never slow the call it describes. The caller only appends
the event to a bounded deque; a daemon thread formats and logs it. When the writer falls
behind by ``max_pending`` events, the oldest pending ones are dropped and counted
(``dropped``) rather than growing memory or blocking.

Turned on by ``Mesh.spec.accessLog: {enabled: true, format: json|text}`` in the policy
(follows reloads) or by ``Mesh(..., access_log="json"|"text")`` (which wins over the policy).
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections import deque
from typing import TYPE_CHECKING, Protocol

from meshlib.observe.events import CallEvent, Observed, attach, detach

if TYPE_CHECKING:
    from meshlib.config.model import Snapshot

logger = logging.getLogger("meshlib.access")

FORMATS = ("json", "text")
#: How long the writer lets events gather once woken, so a busy caller costs one wake-up per
#: batch rather than one per call (lines reach the handlers at most this late).
LINGER = 0.05


class Logged(Observed, Protocol):
    """A mesh whose access log follows its policy (``spec.accessLog``): :class:`meshlib.Mesh`."""

    @property
    def snapshot(self) -> Snapshot: ...


#: The access log each mesh got from :func:`sync_access_log` (weak: dies with its mesh).
_installed: weakref.WeakKeyDictionary[Logged, AccessLog] = weakref.WeakKeyDictionary()


class AccessLog:
    """A call-event consumer that logs each event off the caller's thread."""

    def __init__(
        self, format: str = "json", *, max_pending: int = 10_000, logger_: logging.Logger = logger
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"access log format must be one of {FORMATS}, not {format!r}")
        self.format = format
        self.dropped = 0
        self._logger = logger_
        if logger_.level == logging.NOTSET:  # enabling the log is the opt-in: not lost to the
            logger_.setLevel(logging.INFO)  # root logger's default WARNING level
        self._pending: deque[CallEvent] = deque(maxlen=max_pending)
        self._wake = threading.Event()
        self._idle = False
        self._passes_started = 0  # write passes (for flush: one started after it, done)
        self._passes_done = 0
        self._stop = False
        self._drained = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="meshlib-access-log", daemon=True)
        self._thread.start()

    def __call__(self, event: CallEvent) -> None:
        pending = self._pending
        if len(pending) == pending.maxlen:
            self.dropped += 1  # the append below pushes the oldest out
        pending.append(event)
        if self._idle:  # wake the writer only when it sleeps: no per-event syscall under load
            self._wake.set()

    def line(self, event: CallEvent) -> str:
        if self.format == "json":
            return json.dumps(event.as_dict(), separators=(",", ":"))
        return event.text()

    def _run(self) -> None:
        pending = self._pending
        wake = self._wake
        while True:
            self._write_pending()
            if self._stop:
                return
            self._idle = True
            if not pending:  # re-checked after announcing idleness: an append may have raced it
                wake.wait()
            self._idle = False
            wake.clear()
            if not self._stop:  # let a batch gather: one wake-up per batch, not per event
                wake.wait(LINGER)

    def _write_pending(self) -> None:
        with self._drained:
            self._passes_started += 1
        pending = self._pending
        while pending:
            event = pending.popleft()
            try:
                self._logger.info(self.line(event))
            except Exception:  # a broken handler must not kill the writer
                logging.getLogger("meshlib.observe").exception("access log write failed")
        with self._drained:
            self._passes_done += 1
            self._drained.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every event appended so far is logged (for tests and shutdown): a write
        pass that starts after this call has finished."""
        with self._drained:
            target = self._passes_started + 1
        self._wake.set()
        with self._drained:
            return self._drained.wait_for(lambda: self._passes_done >= target, timeout)

    def close(self) -> None:
        """Log what is pending, then stop the writer."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5.0)


def sync_access_log(mesh: Logged, requested: str | None) -> None:
    """Attach, replace or detach the mesh's access log to match ``requested`` (the
    ``access_log`` argument, which wins) or else the snapshot's ``spec.accessLog``."""
    wanted = requested if requested is not None else mesh.snapshot.mesh.access_log
    current = _installed.get(mesh)
    if current is not None and current.format == wanted:
        return
    if current is not None:
        detach(mesh, current)
        current.close()
        del _installed[mesh]
    if wanted is not None:
        new = _installed[mesh] = AccessLog(wanted)
        attach(mesh, new)


def access_log_of(mesh: Logged) -> AccessLog | None:
    """The access log :func:`sync_access_log` installed on ``mesh``, if any."""
    return _installed.get(mesh)
