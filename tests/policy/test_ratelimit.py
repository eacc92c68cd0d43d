"""TokenBucket: a burst, then a steady refill rate."""

from __future__ import annotations

import pytest

from meshlib.config.model import RateLimitPolicy
from meshlib.policy.ratelimit import TokenBucket


def takes(bucket: TokenBucket, now: float, tries: int = 1000) -> int:
    return sum(bucket.take(now) for _ in range(tries))


def test_burst_then_refuse() -> None:
    bucket = TokenBucket(RateLimitPolicy(requests_per_second=10.0, burst=5), now=0.0)
    assert takes(bucket, 0.0) == 5
    assert not bucket.take(0.0)


def test_refills_at_the_configured_rate() -> None:
    bucket = TokenBucket(RateLimitPolicy(requests_per_second=10.0, burst=5), now=0.0)
    takes(bucket, 0.0)
    assert not bucket.take(0.05)  # half a token
    assert bucket.take(0.1)  # one token after 100 ms
    assert not bucket.take(0.1)
    assert takes(bucket, 0.4) == 3


def test_steady_rate_over_time() -> None:
    bucket = TokenBucket(RateLimitPolicy(requests_per_second=20.0, burst=1), now=0.0)
    admitted = 0
    for i in range(10_000):  # 1000 attempts/s for 10 s
        admitted += bucket.take(i / 1000.0)
    assert 195 <= admitted <= 202  # 20/s × 10 s, plus the initial token


def test_refill_is_capped_at_burst() -> None:
    bucket = TokenBucket(RateLimitPolicy(requests_per_second=10.0, burst=5), now=0.0)
    takes(bucket, 0.0)
    assert takes(bucket, 3600.0) == 5


def test_clock_going_back_adds_nothing() -> None:
    bucket = TokenBucket(RateLimitPolicy(requests_per_second=10.0, burst=2), now=10.0)
    takes(bucket, 10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(10.05)
    assert bucket.take(10.11)


@pytest.mark.parametrize("rate", [0.5, 3.0, 100.0])
def test_fractional_rates(rate: float) -> None:
    bucket = TokenBucket(RateLimitPolicy(requests_per_second=rate, burst=1), now=0.0)
    assert bucket.take(0.0)
    assert not bucket.take(0.99 / rate)
    assert bucket.take(1.0 / rate + 1e-9)
