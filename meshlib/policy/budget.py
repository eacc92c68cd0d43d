"""Retry budgets: retries may add at most ``ratio`` × calls plus ``min_per_second`` per second,
counted over a sliding window of ``ttl`` seconds, per destination.

Why budgets and not only max-retries: with "3 retries per call", a full outage multiplies load by
4 exactly when the destination can least afford it. A budget bounds the extra load to a fraction
of real traffic whatever the outage, and the per-second floor keeps low-traffic callers able to
retry at all (Finagle RetryBudget, Linkerd, Envoy retry_budget).
"""

from __future__ import annotations

import math

from meshlib.config.model import BudgetPolicy

#: Number of buckets the window is cut into; resolution is ttl / _BUCKETS.
_BUCKETS = 10


class RetryBudget:
    """A sliding-window counter of calls and retries; time is passed in (monotonic seconds)."""

    __slots__ = ("_calls", "_epoch", "_retries", "_width", "policy")

    def __init__(self, policy: BudgetPolicy) -> None:
        self.policy = policy
        self._width = policy.ttl / _BUCKETS
        self._calls = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._epoch = -1  # index of the newest bucket, in units of _width since time 0

    def _advance(self, now: float) -> int:
        # Callers read the clock before taking the lock, so times may arrive slightly out of
        # order: an older time counts in the newest bucket rather than moving the window back.
        epoch = max(int(now / self._width), self._epoch)
        if epoch != self._epoch:
            stale = min(epoch - self._epoch, _BUCKETS) if self._epoch >= 0 else _BUCKETS
            for i in range(stale):
                slot = (epoch - i) % _BUCKETS
                self._calls[slot] = 0
                self._retries[slot] = 0
            self._epoch = epoch
        return epoch % _BUCKETS

    def deposit(self, now: float) -> None:
        """Count one call (not attempt)."""
        self._calls[self._advance(now)] += 1

    def balance(self, now: float) -> float:
        """Retries still allowed in the current window."""
        self._advance(now)
        p = self.policy
        allowed = p.ratio * sum(self._calls) + p.min_per_second * p.ttl
        return allowed - sum(self._retries)

    def try_withdraw(self, now: float) -> bool:
        """Spend one retry if the budget allows it."""
        if not math.isfinite(self.policy.ratio) or self.policy.ratio < 0:
            return False  # an invalid budget disables retries rather than allowing unlimited
        if self.balance(now) < 1.0:
            return False
        self._retries[self._epoch % _BUCKETS] += 1
        return True
