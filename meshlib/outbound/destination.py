"""Run-time state of one destination service: endpoint health, breaker, retry budget, rate
limit, in-flight count and recent latencies. It outlives snapshots: a reload updates the
policies and endpoint list in place and keeps the health it learned. Its endpoints are the
policy's static ones plus those discovered from the registry (static wins on an address)."""

from __future__ import annotations

import threading
from collections import deque

from meshlib.config.model import EffectivePolicy, Endpoint, ServiceDef
from meshlib.policy.balancer import EndpointSet
from meshlib.policy.breaker import CircuitBreaker
from meshlib.policy.budget import RetryBudget
from meshlib.policy.ratelimit import TokenBucket

#: Latency samples kept per destination for the hedging p95.
_LATENCY_WINDOW = 256
#: Fewer samples than this: no p95 yet, so no p95-based hedging.
_MIN_SAMPLES_FOR_P95 = 20


class Destination:
    """Everything the mesh remembers about calling one service. Decisions on this state are
    taken under ``lock``; I/O happens outside it."""

    def __init__(
        self,
        service: ServiceDef,
        policy: EffectivePolicy,
        now: float,
        discovered: tuple[Endpoint, ...] = (),
    ) -> None:
        self.key = service.key
        self.version = 0  # the newest snapshot version this state was updated from
        self.lock = threading.Lock()
        self.service = service
        self.policy = policy
        #: Endpoints the registry reported for this service (:meth:`set_discovered`).
        self.discovered = discovered
        self.endpoints = EndpointSet(
            merge_endpoints(service.endpoints, discovered),
            policy.load_balancer,
            policy.outlier_detection,
        )
        self.breaker = CircuitBreaker(policy.circuit_breaker)
        self.budget = RetryBudget(policy.retries.budget)
        self.rate_limit = TokenBucket(policy.rate_limit, now) if policy.rate_limit else None
        self.in_flight = 0
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._p95: float | None = None
        self._p95_dirty = 0

    def update(self, service: ServiceDef, policy: EffectivePolicy, now: float) -> None:
        """Adopt a new snapshot's view of this service, keeping learned state."""
        with self.lock:
            self.service = service
            old = self.policy
            self.policy = policy
            self.endpoints.update(
                merge_endpoints(service.endpoints, self.discovered),
                policy.load_balancer,
                policy.outlier_detection,
            )
            if policy.circuit_breaker != old.circuit_breaker:
                self.breaker.policy = policy.circuit_breaker
            if policy.retries.budget != old.retries.budget:
                self.budget = RetryBudget(policy.retries.budget)
            if policy.rate_limit != old.rate_limit:
                self.rate_limit = TokenBucket(policy.rate_limit, now) if policy.rate_limit else None

    def set_discovered(self, discovered: tuple[Endpoint, ...]) -> None:
        """Adopt a new discovered set: the endpoint list changes in place, endpoints that stay
        keep their health (an ejected one stays ejected); nothing else is touched."""
        with self.lock:
            self.discovered = discovered
            policy = self.policy
            self.endpoints.update(
                merge_endpoints(self.service.endpoints, discovered),
                policy.load_balancer,
                policy.outlier_detection,
            )

    def record_latency(self, seconds: float) -> None:
        self._latencies.append(seconds)
        self._p95_dirty += 1

    def p95(self) -> float | None:
        """The 95th percentile of recent successful attempt latencies (None: too few)."""
        if self._p95_dirty >= 16 or (self._p95 is None and self._p95_dirty):
            samples = sorted(self._latencies)
            self._p95_dirty = 0
            if len(samples) >= _MIN_SAMPLES_FOR_P95:
                self._p95 = samples[min(len(samples) - 1, int(len(samples) * 0.95))]
        return self._p95


def merge_endpoints(
    static: tuple[Endpoint, ...], discovered: tuple[Endpoint, ...]
) -> tuple[Endpoint, ...]:
    """The policy's endpoints, then the discovered ones at other addresses: an endpoint the
    operator wrote (its weight, its labels) wins over the registry's view of the same address."""
    if not discovered:
        return static
    if not static:
        return discovered
    taken = {e.address for e in static}
    return static + tuple(e for e in discovered if e.address not in taken)
