"""Test doubles for the pure policy core: a fake monotonic clock and binomial bounds."""

from __future__ import annotations

import math


class FakeClock:
    """A monotonic clock that only moves when a test advances it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    """Bounds on the number of successes in ``n`` trials of probability ``p`` (mean ± 5σ)."""
    mean = n * p
    spread = sigmas * math.sqrt(n * p * (1.0 - p))
    return mean - spread, mean + spread
