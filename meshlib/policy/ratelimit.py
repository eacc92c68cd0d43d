"""Local rate limiting per destination: a token bucket refilled continuously."""

from __future__ import annotations

from meshlib.config.model import RateLimitPolicy


class TokenBucket:
    __slots__ = ("_last", "_tokens", "policy")

    def __init__(self, policy: RateLimitPolicy, now: float) -> None:
        self.policy = policy
        self._tokens = float(policy.burst)
        self._last = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        p = self.policy
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(float(p.burst), self._tokens + elapsed * p.requests_per_second)
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
