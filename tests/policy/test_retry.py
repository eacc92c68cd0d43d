"""Retry eligibility, the attempts cap, retryable statuses, full-jitter backoff, Retry-After."""

from __future__ import annotations

import math
import random

import pytest

from meshlib.config.model import BackoffPolicy, RetryPolicy
from meshlib.policy.retry import (
    IDEMPOTENT_METHODS,
    MAX_ATTEMPTS,
    MAX_RETRY_AFTER,
    Failure,
    backoff_delay,
    is_failure_status,
    is_idempotent,
    max_retries,
    parse_retry_after,
    should_retry,
    status_retryable,
)

UNCONFIGURED = RetryPolicy()
CONFIGURED = RetryPolicy(attempts=3, retry_on=frozenset({"5xx", "reset", "timeout"}))
RETRYABLE = RetryPolicy(attempts=3, retry_on=frozenset({"5xx", "reset", "timeout"}), retryable=True)
GATEWAY = RetryPolicy(attempts=3, retry_on=frozenset({"gateway-error"}))
CONNECT_ONLY = RetryPolicy(attempts=3, retry_on=frozenset({"connect-failure"}))
ONLY_429 = RetryPolicy(attempts=3, retry_on=frozenset({"429"}))

S, C, R, T, E, N = (
    Failure.STATUS,
    Failure.CONNECT,
    Failure.RESET,
    Failure.TIMEOUT,
    Failure.ERROR,
    Failure.NONE,
)

# (policy, failure, status, idempotent, expected) — all with a replayable body.
MATRIX = [
    # Unconfigured: connect failures for every method, resets only for idempotent ones.
    (UNCONFIGURED, C, None, True, True),
    (UNCONFIGURED, C, None, False, True),
    (UNCONFIGURED, R, None, True, True),
    (UNCONFIGURED, R, None, False, False),
    (UNCONFIGURED, S, 503, True, False),
    (UNCONFIGURED, T, None, True, False),
    (UNCONFIGURED, E, None, True, False),
    (UNCONFIGURED, N, 200, True, False),
    # Configured retryOn, idempotent request.
    (CONFIGURED, S, 503, True, True),
    (CONFIGURED, S, 500, True, True),
    (CONFIGURED, S, 429, True, False),
    (CONFIGURED, S, None, True, False),
    (CONFIGURED, R, None, True, True),
    (CONFIGURED, T, None, True, True),
    (CONFIGURED, E, None, True, False),
    (CONFIGURED, C, None, True, True),
    (CONFIGURED, N, 200, True, False),
    # Configured retryOn, non-idempotent request (POST): only connect failures.
    (CONFIGURED, S, 503, False, False),
    (CONFIGURED, R, None, False, False),
    (CONFIGURED, T, None, False, False),
    (CONFIGURED, C, None, False, True),
    # ...unless the route is marked retryable.
    (RETRYABLE, S, 503, False, True),
    (RETRYABLE, R, None, False, True),
    (RETRYABLE, T, None, False, True),
    (RETRYABLE, S, 404, False, False),
    # gateway-error covers 502/503/504 and failures before a response.
    (GATEWAY, S, 502, True, True),
    (GATEWAY, S, 503, True, True),
    (GATEWAY, S, 504, True, True),
    (GATEWAY, S, 500, True, False),
    (GATEWAY, R, None, True, True),
    (GATEWAY, T, None, True, True),
    # connect-failure only: nothing that reached the server.
    (CONNECT_ONLY, S, 503, True, False),
    (CONNECT_ONLY, R, None, True, False),
    (CONNECT_ONLY, T, None, True, False),
    (CONNECT_ONLY, C, None, False, True),
    # A plain status code.
    (ONLY_429, S, 429, True, True),
    (ONLY_429, S, 503, True, False),
]


@pytest.mark.parametrize(("policy", "failure", "status", "idempotent", "expected"), MATRIX)
def test_should_retry_matrix(
    policy: RetryPolicy, failure: Failure, status: int | None, idempotent: bool, expected: bool
) -> None:
    got = should_retry(policy, failure, status, idempotent=idempotent, replayable=True)
    assert got is expected


@pytest.mark.parametrize(("policy", "failure", "status", "idempotent", "_"), MATRIX)
def test_unreplayable_body_is_never_retried(
    policy: RetryPolicy, failure: Failure, status: int | None, idempotent: bool, _: bool
) -> None:
    assert not should_retry(policy, failure, status, idempotent=idempotent, replayable=False)


@pytest.mark.parametrize("method", sorted(IDEMPOTENT_METHODS))
def test_idempotent_methods(method: str) -> None:
    assert is_idempotent(method, {})


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT"])
def test_non_idempotent_methods_unless_idempotency_key(method: str) -> None:
    assert not is_idempotent(method, {})
    assert is_idempotent(method, {"idempotency-key": "k-1"})


@pytest.mark.parametrize(
    ("attempts", "expected"), [(None, 2), (0, 0), (1, 1), (3, 3), (4, 4), (5, 4), (10, 4)]
)
def test_max_retries_clamps_to_five_tries(attempts: int | None, expected: int) -> None:
    assert max_retries(RetryPolicy(attempts=attempts)) == expected
    assert max_retries(RetryPolicy(attempts=attempts)) + 1 <= MAX_ATTEMPTS == 5


@pytest.mark.parametrize(
    ("retry_on", "status", "expected"),
    [
        ({"5xx"}, 500, True),
        ({"5xx"}, 503, True),
        ({"5xx"}, 599, True),
        ({"5xx"}, 499, False),
        ({"5xx"}, 429, False),
        ({"gateway-error"}, 502, True),
        ({"gateway-error"}, 503, True),
        ({"gateway-error"}, 504, True),
        ({"gateway-error"}, 500, False),
        ({"gateway-error"}, 501, False),
        ({"503"}, 503, True),
        ({"503"}, 502, False),
        ({"429"}, 429, True),
        ({"429"}, 503, False),
        ({"retriable-4xx"}, 409, True),
        ({"reset", "timeout", "connect-failure"}, 503, False),
        (set(), 503, False),
    ],
)
def test_status_retryable(retry_on: set[str], status: int, expected: bool) -> None:
    assert status_retryable(frozenset(retry_on), status) is expected


@pytest.mark.parametrize(
    ("status", "expected"), [(200, False), (404, False), (429, True), (500, True)]
)
def test_failure_status(status: int, expected: bool) -> None:
    assert is_failure_status(status) is expected


@pytest.mark.parametrize("retry_number", [1, 2, 3, 4, 5, 8])
def test_backoff_is_full_jitter_under_the_ceiling(retry_number: int) -> None:
    backoff = BackoffPolicy(base=0.025, cap=0.250)
    ceiling = min(backoff.cap, backoff.base * 2 ** (retry_number - 1))
    rng = random.Random(retry_number)
    delays = [backoff_delay(backoff, retry_number, rng, None) for _ in range(2000)]
    assert all(0.0 <= d <= ceiling for d in delays)
    # Full jitter: spread over the whole range, not bunched near the ceiling.
    assert min(delays) < 0.05 * ceiling
    assert max(delays) > 0.95 * ceiling
    assert sum(delays) / len(delays) == pytest.approx(ceiling / 2, rel=0.1)


def test_backoff_is_reproducible_with_a_seed() -> None:
    backoff = BackoffPolicy()
    a = [backoff_delay(backoff, 2, random.Random(42), None) for _ in range(3)]
    b = [backoff_delay(backoff, 2, random.Random(42), None) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize("retry_after", [0.0, 0.1, 1.0, 7.5])
def test_backoff_honours_retry_after(retry_after: float) -> None:
    rng = random.Random(1)
    for n in (1, 3, 6):
        delays = [backoff_delay(BackoffPolicy(), n, rng, retry_after) for _ in range(200)]
        assert all(d >= retry_after for d in delays)
        assert all(d <= max(retry_after, BackoffPolicy().cap) for d in delays)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("3", 3.0),
        (" 3 ", 3.0),
        ("1.5", 1.5),
        ("120", 120.0),
        ("-1", None),
        ("nan", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),  # HTTP-date form is ignored
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_infinity_never_means_retry_soon() -> None:
    got = parse_retry_after("inf")
    assert got is None or (math.isinf(got) and got > MAX_RETRY_AFTER)
