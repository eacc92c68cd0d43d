"""Retry budgets: retries may add at most ``ratio`` × calls (counted over a sliding window of
``ttl`` seconds) plus ``min_per_second`` per second, per destination.

The ratio part is Finagle's: each call deposits ``ratio`` of a retry, deposits and withdrawals
expire after ``ttl``. The floor is a token bucket refilled at ``min_per_second`` holding at most
one second's worth: Finagle grants the whole ``min_per_second × ttl`` reserve at once, which lets
a full outage spend a window's floor in its first second and then again in the next window, so
retries can exceed "ratio × calls + min_per_second × seconds". As a rate, the floor keeps total
attempts within ``(1 + ratio) × calls + min_per_second × seconds (+ one second's burst)``.

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
    """Retry budget of one destination; time is passed in (monotonic seconds)."""

    __slots__ = (
        "_calls",
        "_epoch",
        "_floor",
        "_floor_cap",
        "_floor_stamp",
        "_retries",
        "_width",
        "policy",
    )

    def __init__(self, policy: BudgetPolicy) -> None:
        self.policy = policy
        self._width = policy.ttl / _BUCKETS
        self._calls = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS  # retries paid from the ratio part
        self._epoch = -1  # index of the newest bucket, in units of _width since time 0
        rate = policy.min_per_second
        self._floor_cap = max(1.0, rate) if rate > 0 and math.isfinite(rate) else 0.0
        self._floor = self._floor_cap
        self._floor_stamp: float | None = None

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

    def _refill(self, now: float) -> None:
        if self._floor_stamp is not None and now > self._floor_stamp:
            gained = (now - self._floor_stamp) * self.policy.min_per_second
            self._floor = min(self._floor_cap, self._floor + gained)
        if self._floor_stamp is None or now > self._floor_stamp:
            self._floor_stamp = now

    def deposit(self, now: float) -> None:
        """Count one call (not attempt). Within the newest bucket (the usual case) the window
        does not move, so :meth:`_advance` is skipped."""
        epoch = int(now / self._width)
        if epoch == self._epoch:
            self._calls[epoch % _BUCKETS] += 1
        else:
            self._calls[self._advance(now)] += 1

    def _ratio_balance(self) -> float:
        return self.policy.ratio * sum(self._calls) - sum(self._retries)

    def balance(self, now: float) -> float:
        """Retries allowed right now: the ratio part left in the window plus floor tokens."""
        self._advance(now)
        self._refill(now)
        return self._ratio_balance() + self._floor

    def try_withdraw(self, now: float) -> bool:
        """Spend one retry if the budget allows it (the ratio part first, then the floor)."""
        ratio = self.policy.ratio
        if not math.isfinite(ratio) or ratio < 0:
            return False  # an invalid budget disables retries rather than allowing unlimited
        slot = self._advance(now)
        if self._ratio_balance() >= 1.0:
            self._retries[slot] += 1
            return True
        self._refill(now)
        if self._floor >= 1.0:
            self._floor -= 1.0
            return True
        return False
