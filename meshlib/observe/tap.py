"""The tap: a bounded ring of recent call events and live subscribers (``linkerd viz tap``).

Every buffer is bounded and nothing here ever blocks the caller that emits an event: the ring
keeps the last ``size`` events; each subscriber has its own bounded queue and, when a reader
falls behind, drops either the oldest queued events (the default: a live view wants the newest)
or the new ones, counting them in ``dropped``. Emission is thread-safe (sync callers on many
threads); readers wait with :meth:`Subscription.get` (threads) or :meth:`Subscription.next`
(asyncio), woken once per wait rather than once per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable

from meshlib.observe.events import CallEvent

Predicate = Callable[[CallEvent], bool]

DROP_OLDEST = "oldest"
DROP_NEWEST = "newest"


class Subscription:
    """One live reader's bounded queue of events (created by :meth:`Tap.subscribe`)."""

    def __init__(self, tap: Tap, size: int, predicate: Predicate | None, drop: str) -> None:
        if size < 1:
            raise ValueError("a subscription holds at least one event")
        if drop not in (DROP_OLDEST, DROP_NEWEST):
            raise ValueError(f"drop must be {DROP_OLDEST!r} or {DROP_NEWEST!r}, not {drop!r}")
        self._tap = tap
        self._items: deque[CallEvent] = deque()
        self._size = size
        self._predicate = predicate
        self._drop = drop
        self._waiter: Callable[[], None] | None = None
        self.dropped = 0

    def matches(self, event: CallEvent) -> bool:
        return self._predicate is None or self._predicate(event)

    def _offer(self, event: CallEvent) -> Callable[[], None] | None:
        """Queue ``event`` (under the tap's lock); returns the waiter to wake, if any."""
        if not self.matches(event):
            return None
        items = self._items
        if len(items) >= self._size:
            self.dropped += 1
            if self._drop == DROP_NEWEST:
                return None
            items.popleft()
        items.append(event)
        waiter, self._waiter = self._waiter, None
        return waiter

    def _take(self, waiter: Callable[[], None]) -> CallEvent | None:
        """An event if one came; forgets ``waiter`` (a timed-out wait must not be woken later,
        e.g. on an event loop that has closed since)."""
        with self._tap._lock:
            if self._waiter == waiter:
                self._waiter = None
            return self._items.popleft() if self._items else None

    def _arm(self, waiter: Callable[[], None]) -> CallEvent | None:
        """Take an event, or register ``waiter`` to be called when one arrives."""
        with self._tap._lock:
            if self._items:
                return self._items.popleft()
            self._waiter = waiter
            return None

    def get(self, timeout: float | None = None) -> CallEvent | None:
        """The next event, waiting up to ``timeout`` seconds on this thread (None: none came)."""
        ready = threading.Event()
        event = self._arm(ready.set)
        if event is not None:
            return event
        ready.wait(timeout)
        return self._take(ready.set)

    async def next(self, timeout: float | None = None) -> CallEvent | None:
        """The next event, awaiting up to ``timeout`` seconds (None: none came)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def wake() -> None:  # may run on any thread
            loop.call_soon_threadsafe(_resolve, future)

        event = self._arm(wake)
        if event is not None:
            return event
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(future, timeout)
        return self._take(wake)

    def close(self) -> None:
        self._tap.unsubscribe(self)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Tap:
    """A call-event consumer: the last ``size`` events, and fan-out to live subscribers."""

    def __init__(self, size: int = 1000) -> None:
        self._lock = threading.Lock()
        self._ring: deque[CallEvent] = deque(maxlen=size)
        self._subscribers: tuple[Subscription, ...] = ()

    def __call__(self, event: CallEvent) -> None:
        wake: list[Callable[[], None]] = []
        with self._lock:
            self._ring.append(event)
            for sub in self._subscribers:
                waiter = sub._offer(event)
                if waiter is not None:
                    wake.append(waiter)
        for waiter in wake:  # outside the lock: a waiter may take it
            waiter()

    def recent(self, predicate: Predicate | None = None) -> list[CallEvent]:
        with self._lock:
            events = list(self._ring)
        return events if predicate is None else [e for e in events if predicate(e)]

    def subscribe(
        self,
        size: int = 1000,
        predicate: Predicate | None = None,
        *,
        drop: str = DROP_OLDEST,
        recent: bool = False,
    ) -> Subscription:
        """A live subscription; with ``recent`` its queue starts with the matching events of
        the ring (taken atomically with subscribing: nothing missed, nothing twice)."""
        sub = Subscription(self, size, predicate, drop)
        with self._lock:
            if recent:
                for event in self._ring:
                    sub._offer(event)
            self._subscribers = (*self._subscribers, sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
