"""EndpointSet: peak-EWMA P2C, round-robin and random picks, outlier ejection and panic mode.

Pure: a float clock and a seeded ``random.Random``; traffic is simulated event by event.
"""

from __future__ import annotations

import heapq
import random
import sys
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from types import FrameType

import pytest

from meshlib.config.model import Endpoint, LoadBalancerKind, LoadBalancerPolicy, OutlierPolicy
from meshlib.policy.balancer import EndpointSet, EndpointState
from policy.fakes import binomial_bounds

NEVER_EJECT = OutlierPolicy(consecutive_failures=10**9)


def endpoints(n: int, weights: list[int] | None = None) -> list[Endpoint]:
    return [
        Endpoint(f"10.0.0.{i + 1}:80", weight=1 if weights is None else weights[i])
        for i in range(n)
    ]


def by_address(es: EndpointSet) -> dict[str, EndpointState]:
    return {s.address: s for s in es.states}


def fail(es: EndpointSet, state: EndpointState, now: float, times: int) -> list[bool]:
    """Run ``times`` failed attempts on ``state``; the ejection verdict of each."""
    out = []
    for _ in range(times):
        es.on_start(state)
        out.append(es.on_end(state, now, 0.01, failed=True))
    return out


def simulate(
    es: EndpointSet,
    latency: Mapping[str, float] | Callable[[str, float], float],
    failing: Collection[str] = (),
    calls: int = 2000,
    concurrency: int = 1,
    seed: int = 1,
    jitter: float = 0.0,
    picks: list[tuple[float, str]] | None = None,
    crowd: list[int] | None = None,
) -> Counter[str]:
    """Closed-loop traffic: ``concurrency`` workers each pick, start, wait the endpoint's
    latency on the fake clock, end, and pick again. Returns picks per address.

    ``latency`` maps an address to seconds, or is ``f(address, now)`` for an endpoint that
    changes; ``jitter`` adds an exponential delay of that mean to every attempt, as the
    caller's own event loop and scheduler do in the real benchmark (a fast endpoint's peak
    then sits well above its typical latency); ``picks`` collects ``(time, address)`` and
    ``crowd`` the most attempts in flight on one endpoint after each pick."""
    rng = random.Random(seed)
    noise = random.Random(seed + 1)  # its own stream: jitter does not shift the picks' draws
    latency_at = latency if callable(latency) else (lambda address, now: latency[address])
    counts: Counter[str] = Counter()
    in_flight: list[tuple[float, int, float, EndpointState]] = []
    seq = 0

    def start(now: float) -> None:
        nonlocal seq
        state = es.pick(now, rng)
        assert state is not None
        es.on_start(state)
        counts[state.address] += 1
        if picks is not None:
            picks.append((now, state.address))
        if crowd is not None:
            crowd.append(max(s.pending for s in es.states))
        seq += 1
        rtt = latency_at(state.address, now)
        if jitter:
            rtt += noise.expovariate(1.0 / jitter)
        heapq.heappush(in_flight, (now + rtt, seq, rtt, state))

    for _ in range(concurrency):
        start(0.0)
    for _ in range(calls - concurrency):
        now, _, rtt, state = heapq.heappop(in_flight)
        es.on_end(state, now, rtt, failed=state.address in failing)
        start(now)
    return counts


# -- P2C over peak EWMA ----------------------------------------------------------------------------


def test_p2c_prefers_lower_latency_score() -> None:
    es = EndpointSet(endpoints(2))
    slow, fast = es.states
    es.on_end(slow, 1.0, 0.100, failed=False)
    es.on_end(fast, 1.0, 0.010, failed=False)
    rng = random.Random(3)
    picks = Counter(es.pick(1.0, rng).address for _ in range(200))  # type: ignore[union-attr]
    assert picks == {fast.address: 200}


def test_p2c_score_multiplies_latency_by_pending_plus_one() -> None:
    es = EndpointSet(endpoints(2))
    busy, idle = es.states
    es.on_end(busy, 1.0, 0.010, failed=False)
    es.on_end(idle, 1.0, 0.050, failed=False)
    for _ in range(9):  # 0.010 × (9 + 1) = 0.1 > 0.050 × 1
        es.on_start(busy)
    rng = random.Random(3)
    assert {es.pick(1.0, rng).address for _ in range(100)} == {idle.address}  # type: ignore[union-attr]
    for _ in range(8):  # 0.010 × 2 < 0.050: the busy one is cheaper again
        es.on_abandon(busy)
    assert {es.pick(1.0, rng).address for _ in range(100)} == {busy.address}  # type: ignore[union-attr]


def _lines_run(action: Callable[[], object]) -> int:
    """How many lines of Python ``action`` runs (loops included): a count of work, no timer."""
    lines = 0

    def trace(frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        nonlocal lines
        lines += event == "line"
        return trace

    sys.settrace(trace)
    try:
        action()
    finally:
        sys.settrace(None)
    return lines


@pytest.mark.parametrize("kind", [LoadBalancerKind.P2C_EWMA, LoadBalancerKind.RANDOM])
def test_a_pick_among_healthy_endpoints_does_not_scan_them(kind: LoadBalancerKind) -> None:
    """A call's pick is O(1): with every endpoint healthy and of equal weight it does the same
    work for 3 endpoints as for 300 (it used to test every endpoint for ejection, and sum the
    weights twice, on every call)."""
    work = []
    for n in (3, 300):
        es = EndpointSet(endpoints(n), LoadBalancerPolicy(kind=kind))
        for state in es.states:
            es.on_end(state, 1.0, 0.010, failed=False)
        rng = random.Random(7)
        work.append(_lines_run(lambda es=es, rng=rng: es.pick(1.0, rng)))
    assert work[0] == work[1]


def test_p2c_draws_two_distinct_endpoints_uniformly() -> None:
    """Of three endpoints scored 1 < 2 < 3, the worst never wins a distinct pair, and the best
    wins every pair it is in: 2 of the 3 pairs."""
    es = EndpointSet(endpoints(3))
    best, middle, worst = es.states
    for state, rtt in ((best, 0.001), (middle, 0.002), (worst, 0.003)):
        es.on_end(state, 1.0, rtt, failed=False)
    rng = random.Random(13)
    n = 3000
    picks = Counter(es.pick(1.0, rng).address for _ in range(n))  # type: ignore[union-attr]
    assert worst.address not in picks
    low, high = binomial_bounds(n, 2 / 3)
    assert low <= picks[best.address] <= high


@pytest.mark.parametrize("concurrency", [1, 8])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_slow_endpoint_gets_a_small_share(concurrency: int, seed: int) -> None:
    eps = endpoints(5)
    latency = {e.address: 0.010 for e in eps}
    latency[eps[0].address] = 0.100  # ten times slower
    counts = simulate(EndpointSet(eps), latency, concurrency=concurrency, seed=seed)
    assert sum(counts.values()) == 2000
    assert counts[eps[0].address] < 0.05 * 2000  # fair share would be 20%
    for e in eps[1:]:
        assert counts[e.address] > 0.15 * 2000


@pytest.mark.parametrize("concurrency", [1, 8])
def test_fast_errors_count_as_slow(concurrency: int) -> None:
    eps = endpoints(5)
    latency = {e.address: 0.010 for e in eps}
    latency[eps[0].address] = 0.0001  # answers errors a hundred times faster
    es = EndpointSet(eps, outlier=NEVER_EJECT)  # isolate the balancer from ejection
    counts = simulate(es, latency, failing={eps[0].address}, concurrency=concurrency)
    assert counts[eps[0].address] <= 2000 / 5  # not more than its fair share
    assert counts[eps[0].address] < 0.05 * 2000


def test_idle_endpoint_cost_decays_so_it_is_probed_again() -> None:
    es = EndpointSet(endpoints(2))
    slow, fast = es.states
    es.on_end(slow, 0.0, 1.0, failed=False)
    es.on_end(fast, 0.0, 0.01, failed=False)
    decay = es.balancer.decay
    assert slow.cost(0.0, decay) == pytest.approx(1.0)
    assert slow.cost(100.0, decay) < fast.cost(0.0, decay)


def test_never_observed_endpoint_is_probed_one_at_a_time() -> None:
    es = EndpointSet(endpoints(3))
    a, b, new = es.states
    es.on_end(a, 1.0, 0.05, failed=False)
    es.on_end(b, 1.0, 0.05, failed=False)
    rng = random.Random(5)
    # Cost 0: the new endpoint wins every pair it is part of.
    first = [es.pick(1.0, rng) for _ in range(300)]
    assert first.count(new) > 100
    es.on_start(new)  # one probe in flight, no answer yet
    assert new not in [es.pick(1.0, rng) for _ in range(300)]
    es.on_end(new, 1.2, 0.01, failed=False)  # it answered, and fast
    assert [es.pick(1.2, rng) for _ in range(300)].count(new) > 100


# -- one slow endpoint of three: the p99 cliff ----------------------------------------------------

#: The caller's own delay on every attempt, as a fraction of the fast latency (exponential mean):
#: in the real benchmark the healthy p99 is 1.5–2.4× the fast endpoints' delay.
JITTER = 0.35
TAIL_CALLS = 20_000


def share(picks: list[tuple[float, str]], address: str, start: float, end: float) -> float:
    window = [a for t, a in picks if start <= t < end]
    assert len(window) > 100, "the window must hold enough picks to mean anything"
    return window.count(address) / len(window)


@pytest.mark.parametrize(
    ("fast", "slow"), [(0.002, 0.020), (0.020, 0.200)], ids=["2-20ms", "20-200ms"]
)
@pytest.mark.parametrize("seed", [1, 2])
def test_one_slow_endpoint_of_three_stays_below_the_p99_cliff(
    fast: float, slow: float, seed: int
) -> None:
    """The tail benchmark on the fake clock: 3 endpoints, one ten times slower, 8 callers.
    Any share above 1% puts the callers' p99 at the slow endpoint's latency. Before: the fast
    endpoints' jitter peaks times their 3–4 attempts in flight outscored the idle slow one,
    which was kept one attempt in flight at all times (1.9% of the calls)."""
    eps = endpoints(3)
    latency = {eps[0].address: fast, eps[1].address: fast, eps[2].address: slow}
    es = EndpointSet(eps)
    counts = simulate(es, latency, calls=TAIL_CALLS, concurrency=8, seed=seed, jitter=JITTER * fast)
    cliff, _ = binomial_bounds(TAIL_CALLS, 0.01)  # 5σ below 1%: a share of 1% never gets here
    assert counts[eps[2].address] < cliff, counts


def equal_endpoints(jitter: float, seed: int) -> tuple[list[int], list[int]]:
    """6000 calls by 8 callers on 3 endpoints of 20 ms: picks per endpoint, and the most
    attempts in flight on one endpoint after each pick (past the first 100)."""
    eps = endpoints(3)
    crowd: list[int] = []
    counts = simulate(
        EndpointSet(eps),
        {e.address: 0.020 for e in eps},
        calls=6000,
        concurrency=8,
        seed=seed,
        jitter=jitter * 0.020,
        crowd=crowd,
    )
    return [counts[e.address] for e in eps], crowd[100:]


@pytest.mark.parametrize("seed", [3, 4])
def test_equal_endpoints_share_the_load_evenly(seed: int) -> None:
    """The load term spreads: with equal, steady latencies the shares are even and the 8
    callers never pile up (even is 8/3 attempts in flight per endpoint)."""
    counts, crowd = equal_endpoints(0.0, seed)
    low, high = binomial_bounds(sum(counts), 1 / 3)
    assert all(low <= c <= high for c in counts), counts
    assert max(crowd) <= 4, Counter(crowd)


@pytest.mark.parametrize(("jitter", "floor"), [(JITTER, 0.25), (3 * JITTER, 0.2)])
@pytest.mark.parametrize("seed", [3, 4])
def test_jitter_steers_load_but_never_herds(jitter: float, floor: float, seed: int) -> None:
    """With jitter, an endpoint whose recent worst case is high is avoided for a while (the
    peak at work), so shares are not binomial; but every endpoint keeps most of its fair
    share and the 8 callers (almost) never sit on one endpoint."""
    counts, crowd = equal_endpoints(jitter, seed)
    assert min(counts) > floor * sum(counts), counts
    assert sum(c >= 7 for c in crowd) < 0.01 * len(crowd), Counter(crowd)
    if jitter == JITTER:
        assert max(crowd) <= 5, Counter(crowd)


def test_a_cold_first_answer_is_forgotten_within_a_few_samples() -> None:
    """Warm-up: an endpoint's first answer is often slow (a new connection, a cold process).
    Its typical latency is the plain mean of the samples until their window is full, so the
    load term forgets it in a few answers, not in ``decay`` seconds (where 4 attempts in
    flight at the cold 50 ms would score as high as an idle endpoint at 200 ms)."""
    es = EndpointSet(endpoints(1))
    state = es.states[0]
    now = 1.0
    es.on_start(state)
    es.on_end(state, now, 0.050, failed=False)  # cold
    for _ in range(20):  # then 20 ms answers, 7 ms apart, as under 8 callers
        now += 0.007
        es.on_start(state)
        es.on_end(state, now, 0.020, failed=False)
    for _ in range(4):
        es.on_start(state)
    assert state.score(now, es.balancer.decay) < 5 * 0.022


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_one_slow_endpoint_of_three_stays_below_the_cliff_through_warm_up(seed: int) -> None:
    """The benchmark's start: every endpoint's first 6 attempts open new connections and take
    30 ms more. Once the first answers are in, the slow endpoint gets under 1% of the calls
    of the next seconds. Before: the fast endpoints' cold answers held their typical latency
    at 2× for seconds, and the load term sent the slow one 1.5%."""
    eps = endpoints(3)
    slow = eps[2].address
    attempts: Counter[str] = Counter()

    def latency(address: str, now: float) -> float:
        attempts[address] += 1
        base = 0.200 if address == slow else 0.020
        return base + 0.030 if attempts[address] <= 6 else base

    picks: list[tuple[float, str]] = []
    simulate(
        EndpointSet(eps), latency, calls=1600, concurrency=8, seed=seed, jitter=0.007, picks=picks
    )
    window = [a for t, a in picks if 0.5 <= t < 5.0]
    assert window.count(slow) < 0.01 * len(window), (window.count(slow), len(window))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_an_idle_endpoint_scores_its_peak(seed: int) -> None:
    """With nothing in flight the score is the peak estimate, as in Finagle: the typical
    latency never exceeds it, whatever the samples and their spacing."""
    rng = random.Random(seed)
    es = EndpointSet(endpoints(1))
    state = es.states[0]
    decay = es.balancer.decay
    now = 0.0
    for _ in range(300):
        now += rng.choice([0.0, 0.001, 0.02, 1.0, 7.0])
        es.on_start(state)
        es.on_end(state, now, rng.uniform(0.001, 0.5), failed=rng.random() < 0.05)
        later = now + rng.choice([0.0, 0.5, 5.0])
        assert state.score(later, decay) == pytest.approx(state.cost(later, decay), rel=1e-12)


def test_an_endpoint_that_slows_down_loses_its_load_at_once() -> None:
    """The peak is taken from the first slow answer: the endpoint's share falls from a third
    to under 1% in the very next second."""
    eps = endpoints(3)
    turning = eps[2].address

    def latency(address: str, now: float) -> float:
        return 0.200 if address == turning and now >= 10.0 else 0.020

    picks: list[tuple[float, str]] = []
    simulate(
        EndpointSet(eps), latency, calls=9000, concurrency=8, seed=5, jitter=0.007, picks=picks
    )
    assert share(picks, turning, 5.0, 10.0) > 0.25
    assert share(picks, turning, 10.5, 11.5) < 0.01
    assert share(picks, turning, 11.5, 20.0) < 0.01


def test_a_slow_endpoint_that_recovers_gets_its_share_back() -> None:
    """The decay: an idle slow endpoint's estimate fades (τ = 10 s), it is probed again, its
    fast answers blend in, and within a few τ it carries a near-even share again."""
    eps = endpoints(3)
    recovering = eps[2].address

    def latency(address: str, now: float) -> float:
        return 0.200 if address == recovering and now < 10.0 else 0.020

    picks: list[tuple[float, str]] = []
    simulate(
        EndpointSet(eps), latency, calls=16000, concurrency=8, seed=6, jitter=0.007, picks=picks
    )
    assert share(picks, recovering, 5.0, 10.0) < 0.01
    assert share(picks, recovering, 40.0, 50.0) > 0.25


# -- round-robin and random ------------------------------------------------------------------------


def test_round_robin_is_even() -> None:
    es = EndpointSet(endpoints(4), LoadBalancerPolicy(kind=LoadBalancerKind.ROUND_ROBIN))
    rng = random.Random(1)
    counts = Counter(es.pick(0.0, rng).address for _ in range(400))  # type: ignore[union-attr]
    assert sorted(counts.values()) == [100, 100, 100, 100]


def test_round_robin_cycles_in_order() -> None:
    es = EndpointSet(endpoints(3), LoadBalancerPolicy(kind=LoadBalancerKind.ROUND_ROBIN))
    rng = random.Random(1)
    seq = [es.pick(0.0, rng).address for _ in range(6)]  # type: ignore[union-attr]
    assert seq[:3] == seq[3:] and len(set(seq[:3])) == 3


@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 2, 7], [5, 0, 5]])
def test_random_follows_weights(weights: list[int]) -> None:
    es = EndpointSet(endpoints(3, weights), LoadBalancerPolicy(kind=LoadBalancerKind.RANDOM))
    rng = random.Random(11)
    n = 5000
    counts = Counter(es.pick(0.0, rng).address for _ in range(n))  # type: ignore[union-attr]
    total = sum(weights)
    for state, weight in zip(es.states, weights, strict=True):
        if weight == 0:
            assert counts[state.address] == 0
            continue
        low, high = binomial_bounds(n, weight / total)
        assert low <= counts[state.address] <= high, (weights, counts)


# -- avoid (retries go elsewhere) ------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(LoadBalancerKind))
def test_avoid_sends_a_retry_elsewhere(kind: LoadBalancerKind) -> None:
    es = EndpointSet(endpoints(3), LoadBalancerPolicy(kind=kind))
    a, b, c = es.states
    rng = random.Random(2)
    for _ in range(100):
        assert es.pick(0.0, rng, avoid=[a.address]) in (b, c)
        assert es.pick(0.0, rng, avoid=[a.address, c.address]) is b


def test_avoid_everything_still_picks_one() -> None:
    es = EndpointSet(endpoints(2))
    rng = random.Random(2)
    addresses = [s.address for s in es.states]
    assert es.pick(0.0, rng, avoid=addresses) in es.states
    lone = EndpointSet(endpoints(1))
    assert lone.pick(0.0, rng, avoid=[lone.states[0].address]) is lone.states[0]


def test_no_endpoints_picks_none() -> None:
    assert EndpointSet([]).pick(0.0, random.Random(1)) is None


# -- outlier detection -----------------------------------------------------------------------------


def test_ejected_after_consecutive_failures_and_back_after_ejection_time() -> None:
    outlier = OutlierPolicy(consecutive_failures=5, base_ejection_time=30.0)
    es = EndpointSet(endpoints(4), outlier=outlier)
    bad = es.states[0]
    assert fail(es, bad, 100.0, 5) == [False, False, False, False, True]
    assert bad.is_ejected(100.0) and es.ejections == 1
    rng = random.Random(4)
    assert bad not in [es.pick(100.0, rng) for _ in range(200)]
    assert bad.is_ejected(129.9)
    assert not bad.is_ejected(130.0)
    assert bad in es.candidates(130.0)


def test_success_resets_consecutive_failures() -> None:
    es = EndpointSet(endpoints(4), outlier=OutlierPolicy(consecutive_failures=3))
    state = es.states[0]
    fail(es, state, 1.0, 2)
    es.on_start(state)
    es.on_end(state, 1.0, 0.01, failed=False)
    assert fail(es, state, 1.0, 2) == [False, False]
    assert not state.is_ejected(1.0)


def test_ejection_time_grows_with_each_ejection_up_to_the_cap() -> None:
    outlier = OutlierPolicy(consecutive_failures=2, base_ejection_time=30.0, max_ejection_time=70.0)
    es = EndpointSet(endpoints(4), outlier=outlier)
    bad = es.states[0]
    now = 0.0
    durations = []
    for _ in range(4):
        assert fail(es, bad, now, 2)[-1] is True
        durations.append(bad.ejected_until - now)
        now = bad.ejected_until  # returns, fails again at once
    assert durations == [30.0, 60.0, 70.0, 70.0]
    assert bad.times_ejected == 4


def test_max_ejection_percent_is_respected() -> None:
    outlier = OutlierPolicy(consecutive_failures=5, max_ejection_percent=10.0)
    es = EndpointSet(endpoints(10), outlier=outlier)
    for state in es.states[:3]:
        fail(es, state, 1.0, 5)
    assert [s.is_ejected(1.0) for s in es.states].count(True) == 1
    assert es.ejections == 1


def test_zero_ejection_percent_disables_ejection() -> None:
    es = EndpointSet(endpoints(4), outlier=OutlierPolicy(max_ejection_percent=0.0))
    assert True not in fail(es, es.states[0], 1.0, 20)


def test_at_least_one_endpoint_is_ejectable() -> None:
    # 3 × 20% rounds down to 0; Envoy still allows one ejection.
    es = EndpointSet(endpoints(3), outlier=OutlierPolicy(max_ejection_percent=20.0))
    assert fail(es, es.states[0], 1.0, 5)[-1] is True


def test_panic_mode_uses_all_endpoints() -> None:
    outlier = OutlierPolicy(consecutive_failures=1, max_ejection_percent=100.0, panic_threshold=50)
    es = EndpointSet(endpoints(4), outlier=outlier)
    fail(es, es.states[0], 1.0, 1)
    assert es.candidates(1.0) == es.states[1:] and not es.panic
    fail(es, es.states[1], 1.0, 1)  # 50% healthy: not below the threshold
    assert es.candidates(1.0) == es.states[2:] and not es.panic
    fail(es, es.states[2], 1.0, 1)  # 25% healthy < 50%: panic
    assert [s.is_ejected(1.0) for s in es.states] == [True, True, True, False]
    assert es.candidates(1.0) == es.states and es.panic
    rng = random.Random(9)
    picked = {es.pick(1.0, rng).address for _ in range(300)}  # type: ignore[union-attr]
    assert len(picked) == 4


def test_lone_endpoint_is_never_ejected() -> None:
    es = EndpointSet(endpoints(1), outlier=OutlierPolicy(consecutive_failures=1))
    only = es.states[0]
    assert True not in fail(es, only, 1.0, 50)
    assert not only.is_ejected(1.0)
    assert es.pick(1.0, random.Random(1)) is only


def test_update_keeps_health_of_endpoints_still_listed() -> None:
    eps = endpoints(3)
    es = EndpointSet(eps, outlier=OutlierPolicy(consecutive_failures=2))
    a, b, _ = es.states
    fail(es, a, 1.0, 2)
    es.on_end(b, 1.0, 0.25, failed=False)
    es.on_start(b)
    new = Endpoint("10.0.0.9:80")
    reweighted = Endpoint(b.address, weight=5)
    es.update([eps[0], reweighted, new], LoadBalancerPolicy(), OutlierPolicy())
    states = by_address(es)
    assert list(states) == [a.address, b.address, new.address]
    assert states[a.address] is a and a.is_ejected(1.0)
    assert states[b.address] is b and b.pending == 1 and b.endpoint.weight == 5
    assert b.cost(1.0, es.balancer.decay) == pytest.approx(0.25)
    assert states[new.address].requests == 0 and not states[new.address].is_ejected(1.0)
    assert eps[2].address not in states
    assert es.outlier == OutlierPolicy()
