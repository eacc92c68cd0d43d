"""Circuit breaking per backend: closed → open after N consecutive failed *calls* → half-open
with a single probe call after the open duration → closed on its success, open again on its
failure.

The breaker counts what its callers saw: one verdict per call, taken from the call's final
outcome after retries and endpoint switching — never one per attempt. A single bad endpoint
whose failures retries absorb is outlier detection's business (:mod:`meshlib.policy.balancer`);
the breaker opens when calls to the backend as a whole keep failing.

Native rather than pybreaker: pybreaker's half-open state admits every concurrent caller (not one
probe), reads the wall clock, and holds a threading lock around the call, which cannot be awaited
in async code. This breaker only decides; the call sequence reports outcomes (docs/design.md).
"""

from __future__ import annotations

import enum

from meshlib.config.model import CircuitBreakerPolicy


class BreakerState(enum.Enum):
    CLOSED = "closed"  # traffic flows
    OPEN = "open"  # traffic refused
    HALF_OPEN = "half_open"  # one probe in flight decides


class Admission(enum.Enum):
    """The breaker's answer to one call; the call hands it back with its verdict, so a verdict
    is only counted in the state the call was admitted in."""

    REFUSED = "refused"  # not admitted: the caller gets CircuitOpenError, nothing to report
    CALL = "call"  # admitted while closed
    PROBE = "probe"  # the one call admitted in half-open: its verdict decides


_CLOSED = BreakerState.CLOSED
_CALL = Admission.CALL
_PROBE = Admission.PROBE


class CircuitBreaker:
    """State machine for one backend; time is passed in (monotonic seconds)."""

    __slots__ = ("_failures", "_opened_at", "_probe_in_flight", "policy", "state")

    def __init__(self, policy: CircuitBreakerPolicy) -> None:
        self.policy = policy
        self.state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    def admit(self, now: float) -> Admission:
        """Whether a call may go out now. In half-open, admits exactly one probe."""
        if self.state is _CLOSED:
            return _CALL
        if self.state is BreakerState.OPEN:
            if now - self._opened_at < self.policy.open_duration:
                return Admission.REFUSED
            self.state = BreakerState.HALF_OPEN
            self._probe_in_flight = False
        if self._probe_in_flight:
            return Admission.REFUSED
        self._probe_in_flight = True
        return _PROBE

    def on_success(self, admission: Admission) -> None:
        """The call admitted with ``admission`` ended well for its caller."""
        if admission is _CALL:
            if self.state is _CLOSED:
                self._failures = 0
            # else a late answer to a call admitted before the trip: the timer and probe decide
        elif admission is _PROBE and self.state is BreakerState.HALF_OPEN:
            self.state = _CLOSED
            self._probe_in_flight = False
            self._failures = 0

    def on_failure(self, admission: Admission, now: float) -> None:
        """The call admitted with ``admission`` failed for its caller (after its retries)."""
        if admission is _CALL:
            if self.state is _CLOSED:
                self._failures += 1
                if self._failures >= self.policy.consecutive_failures:
                    self._trip(now)
        elif admission is _PROBE and self.state is BreakerState.HALF_OPEN:
            self._trip(now)

    def on_abandon(self, admission: Admission) -> None:
        """The call admitted with ``admission`` ended without a verdict (cancelled, refused
        locally before any attempt): a probe's slot is given back for the next call."""
        if admission is _PROBE and self.state is BreakerState.HALF_OPEN:
            self._probe_in_flight = False

    def _trip(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self._opened_at = now
        self._probe_in_flight = False
        self._failures = 0
