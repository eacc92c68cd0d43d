"""Retry eligibility and backoff: which failures may be tried again, for which requests.

One classification of each attempt's outcome (:class:`Failure`) feeds retries, the circuit
breaker, outlier detection and metrics alike.

Eligibility (DESIGN.md §4, docs/retries.md):

* A body that cannot be replayed is never retried.
* Unconfigured retries (no ``retries`` in any policy): up to 2, only for failures that provably
  never reached the server (connect refused/failed) — plus, for idempotent methods, a reset
  before any response byte (the keep-alive race on a pooled connection).
* Configured ``retryOn`` applies to idempotent methods (RFC 9110: GET, HEAD, OPTIONS, TRACE, PUT,
  DELETE, or any request carrying ``Idempotency-Key``), or to every method on a route marked
  ``retryable``. Connect failures are retried for every method.
* Nothing is retried once response headers were handed to the caller (committed).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Mapping
from functools import lru_cache

from meshlib.config.model import BackoffPolicy, RetryPolicy

#: Total tries per call whatever the configuration says (gRFC A6).
MAX_ATTEMPTS = 5

#: Retries when no policy configures them (they only cover never-sent failures).
UNCONFIGURED_RETRIES = 2

#: A ``Retry-After`` longer than this (or than the remaining deadline) ends the call instead.
MAX_RETRY_AFTER = 10.0

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class Failure(enum.Enum):
    """How one attempt went, as far as policy is concerned."""

    NONE = "ok"  # a response the caller should get (2xx–4xx, or 5xx not retried)
    STATUS = "status"  # a response whose status a policy may treat as failure
    CONNECT = "connect_failure"  # never reached the server (refused, connect timeout)
    RESET = "reset"  # connection broke after sending, before response headers
    TIMEOUT = "timeout"  # the per-try timeout (or deadline) expired before headers
    ERROR = "error"  # another transport error


def is_failure_status(status: int) -> bool:
    """Statuses that make an attempt a failed one for the balancer (429 included: an
    overloaded endpoint is avoided); endpoint health, outlier detection and the breaker count
    only 5xx, the breaker once per call."""
    return status >= 500 or status == 429


def is_idempotent(method: str, headers: Mapping[str, str]) -> bool:
    """RFC 9110 idempotent methods, or any request carrying an ``Idempotency-Key`` (the header
    is only looked up for other methods: the lookup is the costly part)."""
    return method in IDEMPOTENT_METHODS or "idempotency-key" in headers


def status_retryable(retry_on: frozenset[str], status: int) -> bool:
    if str(status) in retry_on:
        return True
    if status >= 500 and "5xx" in retry_on:
        return True
    if status in (502, 503, 504) and "gateway-error" in retry_on:
        return True
    if status == 409 and "retriable-4xx" in retry_on:
        return True
    return False


def max_retries(policy: RetryPolicy) -> int:
    """Retries allowed for one call, after the hard cap of :data:`MAX_ATTEMPTS` tries."""
    wanted = UNCONFIGURED_RETRIES if policy.attempts is None else policy.attempts
    return max(0, min(wanted, MAX_ATTEMPTS - 1))


def should_retry(
    policy: RetryPolicy,
    failure: Failure,
    status: int | None,
    *,
    idempotent: bool,
    replayable: bool,
) -> bool:
    """Whether this outcome warrants another attempt (budget and deadline checked elsewhere)."""
    if failure is Failure.NONE or not replayable:
        return False
    if failure is Failure.CONNECT:
        return True
    if policy.attempts is None:
        return failure is Failure.RESET and idempotent
    if not (idempotent or policy.retryable):
        return False
    retry_on = policy.retry_on
    if failure is Failure.STATUS:
        return status is not None and status_retryable(retry_on, status)
    if failure is Failure.RESET:
        return "reset" in retry_on or "5xx" in retry_on or "gateway-error" in retry_on
    if failure is Failure.TIMEOUT:
        return "timeout" in retry_on or "5xx" in retry_on or "gateway-error" in retry_on
    return False


class _State:
    """The one attribute of ``tenacity.RetryCallState`` that wait strategies read."""

    __slots__ = ("attempt_number",)

    def __init__(self, attempt_number: int) -> None:
        self.attempt_number = attempt_number


@lru_cache(maxsize=64)
def _ceiling(backoff: BackoffPolicy) -> Callable[[_State], float]:
    # tenacity's exponential strategy gives the ceiling; the jitter is ours, from the seeded RNG
    # (tenacity's own jitter uses the global ``random`` and cannot be seeded per mesh).
    import tenacity  # only retries need it: keeps `import meshlib` light

    wait = tenacity.wait_exponential(multiplier=backoff.base, max=backoff.cap, exp_base=2)
    return wait  # type: ignore[return-value]


def backoff_delay(
    backoff: BackoffPolicy, retry_number: int, rng: random.Random, retry_after: float | None
) -> float:
    """Full-jitter delay before retry ``retry_number`` (1-based), at least ``Retry-After``."""
    ceiling = _ceiling(backoff)(_State(retry_number))
    delay = rng.uniform(0.0, ceiling)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form only); None if absent/bad."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # HTTP-date form: ignored rather than trusting a remote wall clock
    if seconds < 0 or seconds != seconds:
        return None
    return seconds
