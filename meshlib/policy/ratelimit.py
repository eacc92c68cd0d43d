"""Local rate limiting per destination: a token bucket refilled continuously."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator

from meshlib.config.model import RateLimitPolicy


def rate_limit_policy(
    value: tuple[float, int] | RateLimitPolicy | None, name: str
) -> RateLimitPolicy | None:
    """A limit given to a constructor as a policy or ``(requests per second, burst)``, checked:
    a ValueError naming the parameter ``name`` unless the rate is finite and above 0 and the
    burst at least 1."""
    if value is None or isinstance(value, RateLimitPolicy):
        policy = value
    else:
        rps, burst = value
        policy = RateLimitPolicy(requests_per_second=float(rps), burst=int(burst))
    if policy is not None and not (0 < policy.requests_per_second < math.inf and policy.burst >= 1):
        raise ValueError(f"{name} needs requests_per_second > 0 and burst >= 1, not {value!r}")
    return policy


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


def retry_after(policy: RateLimitPolicy) -> int:
    """Whole seconds a client refused by ``policy`` should wait (``Retry-After``): one token's
    refill, at least 1."""
    return max(1, math.ceil(1.0 / policy.requests_per_second))


class KeyedLimiter:
    """A token bucket per key (a caller's identity, a client IP), at most ``max_keys`` of them:
    the least recently used is forgotten first, and starts again from a full bucket."""

    def __init__(self, policy: RateLimitPolicy, max_keys: int) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.policy = policy
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __iter__(self) -> Iterator[str]:
        """The keys held, least recently used first."""
        return iter(self._buckets)

    def take(self, key: str, now: float) -> bool:
        """Take a token from ``key``'s bucket (a new key starts full); False: refused.
        Callers serialise calls (they hold a lock)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.policy, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def retry_after(self) -> int:
        """:func:`retry_after` of this limiter's policy."""
        return retry_after(self.policy)
