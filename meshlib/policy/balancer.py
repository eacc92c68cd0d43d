"""Endpoint health and load balancing for one destination: peak-EWMA latency, power of two
choices, round-robin and random picks, and outlier ejection with a panic threshold.

Pure: time (monotonic seconds) and randomness are passed in, so the balancer is tested with a
fake clock and a seeded ``random.Random``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence

from meshlib.config.model import (
    Endpoint,
    LoadBalancerKind,
    LoadBalancerPolicy,
    OutlierPolicy,
)

#: Score of an endpoint never observed but with an attempt in flight: new endpoints are probed
#: (cost 0 makes them first choice) but only one attempt at a time until one answers (Finagle).
_UNOBSERVED_PENALTY = 1e6

#: A failed attempt is observed as at least this slow, so an endpoint answering errors fast
#: does not attract load ("fast errors count as slow", Linkerd load biaser).
FAILURE_PENALTY = 0.5


class EndpointState:
    """Mutable health of one endpoint; owned by its :class:`EndpointSet`."""

    __slots__ = (
        "_cost",
        "_samples",
        "_stamp",
        "_typical",
        "consecutive_failures",
        "ejected_until",
        "endpoint",
        "pending",
        "requests",
        "times_ejected",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._cost = 0.0  # peak-EWMA latency estimate, seconds
        self._typical = 0.0  # plain EWMA of the same samples, seconds; never above _cost
        self._samples = 0  # samples folded into _typical, until its window is full
        self._stamp = -1.0  # when _cost and _typical were last updated; < 0: never
        self.pending = 0  # attempts in flight
        self.requests = 0  # attempts started (for tests and debugging)
        self.consecutive_failures = 0
        self.times_ejected = 0
        self.ejected_until = 0.0

    @property
    def address(self) -> str:
        return self.endpoint.address

    def cost(self, now: float, decay: float) -> float:
        """The peak latency estimate decayed toward zero since the last observation, so an
        idle endpoint is eventually probed again."""
        if self._stamp < 0:
            return self._cost
        elapsed = now - self._stamp
        if elapsed <= 0:
            return self._cost
        return self._cost * math.exp(-elapsed / decay)

    def score(self, now: float, decay: float) -> float:
        """What one more attempt here costs: ``max(peak, typical × (pending + 1))``.

        Finagle and tower score ``peak × (pending + 1)``, charging every attempt in flight at
        the worst recent latency. A fast endpoint's peak is its rarest jitter, held for about
        ``decay``; multiplied by the 3–4 attempts it carries under 8 callers, it outscored an
        idle endpoint ten times slower, which thus kept one attempt in flight at all times
        (1–2% of the calls: the callers' p99). So the load term charges attempts at the
        typical latency, and the peak stays a floor: an idle endpoint scores its peak as in
        Finagle (a slowdown is avoided from its first answer), and with a steady latency the
        score is Finagle's."""
        peak = self._cost
        typical = self._typical
        stamp = self._stamp
        if stamp >= 0 and now > stamp:
            fading = math.exp((stamp - now) / decay)
            peak *= fading
            typical *= fading
        pending = self.pending
        if peak == 0.0 and pending:
            return _UNOBSERVED_PENALTY + pending
        load = typical * (pending + 1)
        return load if load > peak else peak

    def observe(self, now: float, rtt: float, decay: float) -> None:
        """Fold one latency sample in: peaks are taken at once, recoveries decay smoothly
        (Finagle's PeakEwma: ``cost = cost·w + rtt·(1-w)``, ``w = exp(-Δt/τ)``).

        The typical latency blends every sample, with weight ``max(1-w, 1/n)`` for the n-th:
        the plain mean of the samples until there are more than its window holds. With the
        time weight alone the first sample (a new connection, a cold endpoint: 2× the usual in
        the benchmark) would weigh as much as the next ``τ`` seconds of samples, and its load
        term would send traffic to a slower endpoint for that long. Either way it never
        exceeds the peak."""
        samples = self._samples + 1
        self._samples = samples
        if self._stamp < 0:
            self._cost = self._typical = rtt
        else:
            w = math.exp(-(now - self._stamp) / decay) if now > self._stamp else 1.0
            cost = self._cost
            self._cost = rtt if rtt > cost else cost * w + rtt * (1.0 - w)
            fresh = 1.0 - w
            if fresh * samples < 1.0:
                fresh = 1.0 / samples
            self._typical += (rtt - self._typical) * fresh
        self._stamp = now

    def is_ejected(self, now: float) -> bool:
        return self.ejected_until > now


def _uniform(states: Sequence[EndpointState]) -> bool:
    """Whether every endpoint has the same weight (a random pick is then a uniform draw)."""
    return len({s.endpoint.weight for s in states}) <= 1


class EndpointSet:
    """The endpoints of one destination service with their health, and the pick among them."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        balancer: LoadBalancerPolicy | None = None,
        outlier: OutlierPolicy | None = None,
    ) -> None:
        self.balancer = balancer or LoadBalancerPolicy()
        self.outlier = outlier or OutlierPolicy()
        self.states: list[EndpointState] = [EndpointState(e) for e in endpoints]
        self._rr = 0
        self.ejections = 0  # ejections so far (metrics read this)
        self.panic = False  # whether the last pick ran in panic mode
        # What a pick needs, kept current by update() and _eject() so that a pick among
        # healthy endpoints of equal weight (the common case) does O(1) work, not a scan of
        # every endpoint: the latest ejection's end (none is ejected at or after it) and
        # whether every endpoint has the same weight.
        self._ejected_until = 0.0
        self._uniform = _uniform(self.states)

    def update(
        self,
        endpoints: Sequence[Endpoint],
        balancer: LoadBalancerPolicy,
        outlier: OutlierPolicy,
    ) -> None:
        """Adopt a new endpoint list and policy, keeping the health of endpoints still listed."""
        self.balancer = balancer
        self.outlier = outlier
        old = {s.address: s for s in self.states}
        states = []
        for e in endpoints:
            state = old.get(e.address)
            if state is None:
                state = EndpointState(e)
            else:
                state.endpoint = e
            states.append(state)
        self.states = states
        self._uniform = _uniform(states)
        self._ejected_until = max((s.ejected_until for s in states), default=0.0)

    # -- picking --------------------------------------------------------------------------------

    def candidates(self, now: float) -> list[EndpointState]:
        """Endpoints not ejected; all of them when fewer than the panic threshold are healthy."""
        states = self.states
        healthy = [s for s in states if not s.is_ejected(now)]
        if states and len(healthy) * 100.0 < self.outlier.panic_threshold * len(states):
            self.panic = True
            return list(states)
        self.panic = False
        return healthy

    def pick(
        self, now: float, rng: random.Random, avoid: Collection[str] = ()
    ) -> EndpointState | None:
        """Choose an endpoint, preferring ones whose address is not in ``avoid`` (a retry goes
        elsewhere when it can). None when there is no endpoint at all."""
        states = self.states
        if len(states) == 1 and not avoid:
            only = states[0]
            return only
        if now >= self._ejected_until:  # none ejected: no list of candidates to build
            cands = states
            self.panic = False
        else:
            cands = self.candidates(now)
        if avoid:
            others = [s for s in cands if s.address not in avoid]
            if others:
                cands = others
        n = len(cands)
        if n == 0:
            return None
        if n == 1:
            return cands[0]
        kind = self.balancer.kind
        if kind is LoadBalancerKind.ROUND_ROBIN:
            self._rr += 1
            return cands[self._rr % n]
        if kind is LoadBalancerKind.RANDOM:
            return cands[int(rng.random() * n)] if self._uniform else self._weighted(cands, rng)
        # Power of two choices over peak-EWMA: two distinct random candidates, the less loaded.
        if self._uniform:
            # Equal weights: two distinct indices from two draws, without a scan.
            random_ = rng.random
            i = int(random_() * n)
            j = int(random_() * (n - 1))
            a, b = cands[i], cands[j + 1 if j >= i else j]
        else:
            a, b = self._two(cands, rng)
        decay = self.balancer.decay
        return a if a.score(now, decay) <= b.score(now, decay) else b

    @staticmethod
    def _weighted(cands: list[EndpointState], rng: random.Random) -> EndpointState:
        total = 0
        for s in cands:
            total += s.endpoint.weight
        if total == len(cands):
            return cands[rng.randrange(len(cands))]
        x = rng.random() * total
        for s in cands:
            x -= s.endpoint.weight
            if x < 0:
                return s
        return cands[-1]

    def _two(
        self, cands: list[EndpointState], rng: random.Random
    ) -> tuple[EndpointState, EndpointState]:
        a = self._weighted(cands, rng)
        for _ in range(4):  # bounded: distinct second choice, weighted
            b = self._weighted(cands, rng)
            if b is not a:
                return a, b
        i = cands.index(a)
        return a, cands[(i + 1) % len(cands)]

    # -- feedback -------------------------------------------------------------------------------

    def on_start(self, state: EndpointState) -> None:
        state.pending += 1
        state.requests += 1

    def on_end(
        self,
        state: EndpointState,
        now: float,
        rtt: float,
        failed: bool,
        unhealthy: bool | None = None,
    ) -> bool:
        """Record an attempt's outcome. ``failed`` outcomes are observed as slow (a fast error
        must not attract load); ``unhealthy`` ones (default: the same) count toward ejection —
        a 429 is slow but healthy: the endpoint is alive and pushing back.
        Returns True when this outcome ejected the endpoint."""
        pending = state.pending
        state.pending = pending - 1 if pending > 0 else 0
        if failed and rtt < FAILURE_PENALTY:
            rtt = FAILURE_PENALTY
        state.observe(now, rtt, self.balancer.decay)
        if not (failed if unhealthy is None else unhealthy):
            state.consecutive_failures = 0
            return False
        state.consecutive_failures += 1
        if state.consecutive_failures < self.outlier.consecutive_failures:
            return False
        return self._eject(state, now)

    def on_abandon(self, state: EndpointState) -> None:
        """An attempt ended without an outcome for health (cancelled by the caller)."""
        state.pending = max(0, state.pending - 1)

    def _eject(self, state: EndpointState, now: float) -> bool:
        if state.is_ejected(now):
            return False
        total = len(self.states)
        if total < 2:
            return False  # a lone endpoint is never ejected: the circuit breaker covers it
        ejected = sum(1 for s in self.states if s.is_ejected(now))
        percent = self.outlier.max_ejection_percent
        # At least one endpoint is ejectable whenever ejection is enabled at all (Envoy).
        limit = max(1, math.floor(total * percent / 100.0)) if percent > 0 else 0
        if ejected >= limit:
            return False
        state.times_ejected += 1
        duration = min(
            self.outlier.base_ejection_time * state.times_ejected, self.outlier.max_ejection_time
        )
        state.ejected_until = now + duration
        if state.ejected_until > self._ejected_until:
            self._ejected_until = state.ejected_until
        state.consecutive_failures = 0
        self.ejections += 1
        return True
