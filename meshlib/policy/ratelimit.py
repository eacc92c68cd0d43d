"""Local rate limiting per destination: a token bucket refilled continuously."""

from __future__ import annotations

import math

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
