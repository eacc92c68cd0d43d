"""``top``: per-edge aggregates of call events over a sliding window (``linkerd viz top``/``stat``).

An edge is (direction, source, destination, route). For each, over the last ``window``
seconds: requests, request rate, success rate (an event whose flag is ``ok``: not refused or
failed by the mesh and not a 5xx) and p50/p99 latency (nearest rank over the samples kept).
Samples are bounded (``max_samples``, oldest dropped first), so memory stays flat whatever
the traffic; time comes from the mesh's clock so tests drive it.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshlib.observe.events import CallEvent

Edge = tuple[str, str, str, str]


@dataclass(frozen=True)
class EdgeStats:
    direction: str
    source: str
    destination: str
    route: str
    requests: int
    successes: int
    rate: float  # requests per second over the window (or the time observed, if shorter)
    p50: float  # seconds
    p99: float

    @property
    def success_rate(self) -> float:
        return self.successes / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "source": self.source,
            "destination": self.destination,
            "route": self.route,
            "requests": self.requests,
            "successes": self.successes,
            "success_rate": round(self.success_rate, 6),
            "rate": round(self.rate, 6),
            "p50_ms": round(self.p50 * 1000.0, 3),
            "p99_ms": round(self.p99 * 1000.0, 3),
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending list; 0.0 when empty."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


class Top:
    """A call-event consumer keeping ``(time, edge, ok, duration)`` samples for ``window`` s."""

    def __init__(
        self, clock: Callable[[], float], window: float = 60.0, max_samples: int = 100_000
    ) -> None:
        if window <= 0:
            raise ValueError("the top window must be positive")
        self.window = window
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, Edge, bool, float]] = deque(maxlen=max_samples)

    def __call__(self, event: CallEvent) -> None:
        edge = (event.direction, event.source, event.destination, event.route or "")
        self._samples.append((self._clock(), edge, event.ok, event.duration))

    def stats(self) -> list[EdgeStats]:
        """Aggregates per edge over the window, busiest edge first."""
        now = self._clock()
        horizon = now - self.window
        with self._lock:
            samples = self._samples
            while samples and samples[0][0] < horizon:
                samples.popleft()
            kept = list(samples)
        span = min(self.window, max(now - self._started, 1e-9))
        grouped: dict[Edge, tuple[list[float], list[bool]]] = {}
        for _, edge, ok, duration in kept:
            durations, oks = grouped.setdefault(edge, ([], []))
            durations.append(duration)
            oks.append(ok)
        out = []
        for edge, (durations, oks) in grouped.items():
            durations.sort()
            out.append(
                EdgeStats(
                    *edge,
                    requests=len(durations),
                    successes=sum(oks),
                    rate=len(durations) / span,
                    p50=percentile(durations, 50),
                    p99=percentile(durations, 99),
                )
            )
        out.sort(key=lambda s: (-s.requests, s.direction, s.source, s.destination, s.route))
        return out
