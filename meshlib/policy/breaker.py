"""Circuit breaking per backend: closed → open after N consecutive failures → half-open with a
single probe after the open duration → closed on its success, open again on its failure.

Native rather than pybreaker: pybreaker's half-open state admits every concurrent caller (not one
probe), reads the wall clock, and holds a threading lock around the call, which cannot be awaited
in async code. This breaker only decides; the driver reports outcomes (docs/design.md).
"""

from __future__ import annotations

import enum

from meshlib.config.model import CircuitBreakerPolicy


class BreakerState(enum.Enum):
    CLOSED = "closed"  # traffic flows
    OPEN = "open"  # traffic refused
    HALF_OPEN = "half_open"  # one probe in flight decides


class CircuitBreaker:
    """State machine for one backend; time is passed in (monotonic seconds)."""

    __slots__ = ("_failures", "_opened_at", "_probe_in_flight", "policy", "state")

    def __init__(self, policy: CircuitBreakerPolicy) -> None:
        self.policy = policy
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    def allow(self, now: float) -> bool:
        """Whether a call may go out now. In half-open, admits exactly one probe."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if now - self._opened_at < self.policy.open_duration:
                return False
            self.state = BreakerState.HALF_OPEN
            self._probe_in_flight = False
        if self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def on_success(self) -> None:
        if self.state is BreakerState.OPEN:
            return  # a late answer to a call admitted before the trip: the open timer decides
        self._failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self.state = BreakerState.CLOSED
            self._probe_in_flight = False

    def on_failure(self, now: float) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self._trip(now)
            return
        self._failures += 1
        if self.state is BreakerState.CLOSED and self._failures >= self.policy.consecutive_failures:
            self._trip(now)

    def on_abandon(self) -> None:
        """A call admitted by :meth:`allow` ended without a verdict (cancelled, local error)."""
        self._probe_in_flight = False

    def _trip(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self._opened_at = now
        self._probe_in_flight = False
        self._failures = 0
