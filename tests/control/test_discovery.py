"""The client's discovery: the watch rules (index reset, token bucket, back-off, first jitter) on
a fake clock with seeded randomness, the static-stability guard, and the driver over an
in-memory source wrapping the registry's real core (no sockets: the network path is tested
with the registry's server)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from policy.fakes import FakeClock

from control.fakes import MemorySource
from meshlib.config.model import Endpoint
from meshlib.control.cache import CacheFile
from meshlib.control.discovery import (
    Discovery,
    DiscoveryState,
    Pacing,
    ServiceState,
    ServiceView,
    SourceUnavailable,
    WatchRules,
    accept,
    accept_policy,
    split_key,
)
from meshlib.control.registry import Registry, RegistrySettings
from meshlib.control.wire import EndpointsAnswer, PolicyAnswer, RegisteredEndpoint

WORKLOAD = "spiffe://cluster.local/ns/default/sa/reviews"
ADMIN = "spiffe://cluster.local/ns/meshlib-system/sa/meshctl"


def rules(clock: FakeClock, seed: int = 1, **kwargs: object) -> WatchRules:
    return WatchRules(clock, random.Random(seed), **kwargs)  # type: ignore[arg-type]


# --- WatchRules -------------------------------------------------------------------------------


def test_first_query_sends_no_index_then_waits_on_the_answer_index() -> None:
    r = rules(FakeClock())
    assert r.index == 0
    assert r.answered(7, "e1") is True
    assert r.index == 7
    assert r.answered(7, "e1") is False  # a return does not prove a change
    assert r.answered(9, "e1") is True
    assert r.index == 9


def test_index_going_backwards_resets_to_zero() -> None:
    r = rules(FakeClock())
    r.answered(9, "e1")
    assert r.answered(4, "e1") is True
    assert r.index == 0  # the next query answers at once with a fresh snapshot
    r.answered(4, "e1")
    assert r.index == 4


def test_new_epoch_resets_to_zero_even_with_a_higher_index() -> None:
    r = rules(FakeClock())
    r.answered(3, "e1")
    assert r.answered(50, "e2") is True
    assert r.index == 0
    r.answered(50, "e2")
    assert r.index == 50


@pytest.mark.parametrize("index", [0, -3])
def test_an_index_at_or_below_zero_is_never_sent_as_a_wait(index: int) -> None:
    r = rules(FakeClock())
    r.answered(5, "e1")
    r.answered(index, "e1")
    assert r.index == 0
    assert rules(FakeClock(), index=index).index == 0


def test_token_bucket_allows_a_burst_of_two_then_one_per_15_seconds() -> None:
    clock = FakeClock()
    r = rules(clock)
    assert r.take_token() == 0.0
    assert r.take_token() == 0.0
    assert r.take_token() == pytest.approx(15.0)  # answers came back at once: slow down
    clock.advance(15.0)
    assert r.take_token() == pytest.approx(15.0)  # the token waited for is spent
    # 100 answers that return at once in a row cost at least 15 s each after the burst.
    total = 0.0
    for _ in range(100):
        wait = r.take_token()
        clock.advance(wait)
        total += wait
    assert total >= 99 * 15.0


def test_answers_that_carry_a_change_cost_no_token() -> None:
    """A rollout changes a service many times in a row, each answer returning at once: every
    change must be followed at once, not 15 s late (only unchanged instant returns drain)."""
    clock = FakeClock()
    r = rules(clock)
    for index in range(2, 52):
        assert r.take_token() == 0.0
        assert r.answered(index, "e1")
    assert r.take_token() == 0.0
    r.answered(51, "e1")  # no change, back at once
    assert r.take_token() == 0.0
    r.answered(51, "e1")
    assert r.take_token() == pytest.approx(15.0)


def test_failed_requests_are_paced_by_the_back_off_not_the_bucket() -> None:
    """FAULT-6: each failed request of an outage spent a token, so after a 3 s outage a loop
    owed the bucket 15 s per request and resynced 10-25 s after the registry returned. A
    failure is paced by its back-off (full jitter, capped at 30 s) and costs no token."""
    clock = FakeClock()
    r = rules(clock)
    for _ in range(20):
        assert r.take_token() == 0.0
        clock.advance(r.failed())
    r.answered(7, "e1")  # the registry is back: its first answer carries the state
    assert r.take_token() == 0.0


def test_a_blocking_query_refills_the_bucket_while_it_waits() -> None:
    clock = FakeClock()
    r = rules(clock)
    for _ in range(50):
        assert r.take_token() == 0.0
        clock.advance(30.0)  # the long-poll held for its wait


def test_backoff_is_full_jitter_exponential_capped_at_30_seconds() -> None:
    r = rules(FakeClock(), seed=7)
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    delays = [r.failed() for _ in ceilings]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert 0.0 <= delay <= ceiling
    assert len(set(delays)) == len(delays)  # jittered, not a fixed ladder
    r.answered(1, "e")
    assert r.failures == 0
    assert r.failed() <= 0.5  # an answer resets the back-off


def test_backoff_spreads_over_its_whole_range() -> None:
    # Full jitter: uniform over [0, ceiling]; 10,000 draws at the cap, binomial 5 sigma.
    r = rules(FakeClock(), seed=3)
    for _ in range(10):
        r.failed()
    draws = [r.failed() for _ in range(10_000)]
    below = sum(1 for d in draws if d < 15.0)
    assert 10_000 * 0.5 - 5 * 50 <= below <= 10_000 * 0.5 + 5 * 50
    assert max(draws) <= 30.0


def test_retry_after_is_honoured() -> None:
    r = rules(FakeClock(), seed=2)
    assert r.failed(retry_after=7.0) >= 7.0
    assert r.failed(retry_after=0.0) <= 1.0


def test_first_connect_is_jittered_between_zero_and_one_second() -> None:
    delays = [rules(FakeClock(), seed=s).first_delay() for s in range(200)]
    assert all(0.0 <= d <= 1.0 for d in delays)
    assert min(delays) < 0.1 and max(delays) > 0.9


# --- the static-stability guard ------------------------------------------------------------------


def answer(n: int, *, authoritative: bool, index: int = 5, epoch: str = "e1") -> EndpointsAnswer:
    eps = tuple(RegisteredEndpoint(f"id{i}", "10.0.0.1", 8000 + i) for i in range(n))
    return EndpointsAnswer("default", "reviews", index, epoch, authoritative, eps)


def view(n: int) -> ServiceView:
    return ServiceView(tuple(Endpoint(f"10.0.0.1:{8000 + i}") for i in range(n)), n)


def test_authoritative_answers_are_taken_as_is_even_empty() -> None:
    verdict = accept(view(10), answer(0, authoritative=True))
    assert verdict.applied and verdict.view.endpoints == ()
    verdict = accept(view(10), answer(1, authoritative=True))
    assert verdict.applied and len(verdict.view.endpoints) == 1


def test_a_non_authoritative_answer_may_not_empty_a_service() -> None:
    previous = view(3)
    verdict = accept(previous, answer(0, authoritative=False))
    assert not verdict.applied
    assert verdict.view is previous
    assert verdict.reason is not None
    assert "reviews.default" in verdict.reason and "empty" in verdict.reason


def test_a_non_authoritative_answer_may_not_shrink_by_more_than_half() -> None:
    assert not accept(view(10), answer(4, authoritative=False)).applied
    assert accept(view(10), answer(5, authoritative=False)).applied  # exactly half: allowed
    assert accept(view(10), answer(12, authoritative=False)).applied


def test_a_warming_registry_cannot_ratchet_a_service_down_in_steps() -> None:
    current = view(10)
    for n in (6, 4, 3, 2, 1):
        verdict = accept(current, answer(n, authoritative=False, epoch="e2"))
        current = verdict.view
    assert len(current.endpoints) == 6  # 4 and below were refused against the baseline of 10
    assert current.baseline == 10


def test_first_answer_is_taken_whatever_it_is() -> None:
    verdict = accept(None, answer(0, authoritative=False))
    assert verdict.applied and verdict.view.endpoints == ()


def test_policy_acceptance() -> None:
    def p(version: int, authoritative: bool = True) -> PolicyAnswer:
        return PolicyAnswer(version, "text", authoritative=authoritative, epoch="e2")

    assert accept_policy(0, p(1)) is None
    assert accept_policy(3, p(0)) is not None  # a registry with no policy never wipes ours
    assert accept_policy(3, p(3)) == "already applied"
    assert accept_policy(3, p(2, authoritative=False)) is not None
    assert accept_policy(3, p(2, authoritative=True)) is None  # a restored registry, now sure
    assert accept_policy(3, p(4, authoritative=False)) is None


def test_split_key() -> None:
    assert split_key("reviews.default") == ("default", "reviews")
    with pytest.raises(ValueError, match="'reviews'"):
        split_key("reviews")


# --- the driver over an in-memory source ---------------------------------------------------


class RecordingSink:
    """Records every set_endpoints and apply_policy; tests wait on it (bounded)."""

    def __init__(self, reject: str | None = None) -> None:
        self.cond = threading.Condition()
        self.calls: list[tuple[str, tuple[Endpoint, ...], bool]] = []
        self.policies: list[int] = []
        self.reject = reject

    def set_endpoints(
        self, service_key: str, endpoints: tuple[Endpoint, ...], *, authoritative: bool
    ) -> None:
        with self.cond:
            self.calls.append((service_key, endpoints, authoritative))
            self.cond.notify_all()

    def apply_policy(self, answer: PolicyAnswer) -> str | None:
        with self.cond:
            self.policies.append(answer.version)
            self.cond.notify_all()
        return self.reject

    def wait_for(self, what: Callable[[], bool], timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(what, timeout), f"timed out; calls: {self.calls}"

    def addresses(self, key: str) -> list[str]:
        with self.cond:
            last = [eps for k, eps, _ in self.calls if k == key]
        return sorted(e.address for e in last[-1]) if last else []


#: The driver's delays shrunk to milliseconds (the fake clock does not move by itself, so the
#: bucket's debt grows by one interval per request past the burst).
FAST = Pacing(interval=0.01, first_jitter=0.0, backoff_base=0.01, backoff_cap=0.02)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def source(clock: FakeClock) -> MemorySource:
    return MemorySource(Registry("epoch-1", clock(), RegistrySettings(warming=0.0)), clock)


@pytest.fixture
def started() -> Iterator[Callable[..., Discovery]]:
    made: list[Discovery] = []

    def start(*args: object, **kwargs: object) -> Discovery:
        kwargs.setdefault("pacing", FAST)
        kwargs.setdefault("rng", random.Random(5))
        d = Discovery(*args, **kwargs).start()  # type: ignore[arg-type]
        made.append(d)
        return d

    yield start
    for d in made:
        d.stop()


pytestmark = pytest.mark.timeout(20)


def test_driver_delivers_each_change_of_a_watched_service(
    source: MemorySource, started: Callable[..., Discovery]
) -> None:
    sink = RecordingSink()
    source.register(9001)
    d = started(source, sink, services=("reviews.default",), wait=10.0)
    sink.wait_for(lambda: sink.addresses("reviews.default") == ["127.0.0.1:9001"])
    source.register(9002)
    sink.wait_for(lambda: len(sink.addresses("reviews.default")) == 2)
    assert d.up and d.stale_for() == 0.0
    # the second query waited on the first answer's index: a blocking query, not a spin
    with source.lock:
        sent = [i for k, i in source.queries if k == "reviews.default"]
    assert sent[0] == 0 and all(i > 0 for i in sent[1:])
    state = d.state()
    assert state.epoch == "epoch-1"
    assert [e.address for e in state.services["reviews.default"].endpoints] == [
        "127.0.0.1:9001",
        "127.0.0.1:9002",
    ]


def test_watch_adds_a_service_at_run_time_and_only_its_change_wakes_it(
    source: MemorySource, started: Callable[..., Discovery]
) -> None:
    sink = RecordingSink()
    source.register(9001)
    d = started(source, sink, services=("reviews.default",), wait=10.0)
    sink.wait_for(lambda: bool(sink.addresses("reviews.default")))
    d.watch("ratings.default")
    source.register(9100, service="ratings")
    sink.wait_for(lambda: sink.addresses("ratings.default") == ["127.0.0.1:9100"])
    assert d.watched() == ("reviews.default", "ratings.default")
    with sink.cond:
        reviews = [c for c in sink.calls if c[0] == "reviews.default"]
    assert len(reviews) == 1  # a change to ratings did not re-deliver reviews


def test_failures_back_off_honour_retry_after_and_flip_up(
    source: MemorySource, started: Callable[..., Discovery]
) -> None:
    sink = RecordingSink()
    source.register(9001)
    source.failures = [SourceUnavailable("connection refused"), SourceUnavailable("busy", 0.05)]
    d = started(source, sink, services=("reviews.default",), wait=10.0)
    assert not d.up and d.stale_for() is None  # nothing heard yet
    sink.wait_for(lambda: bool(sink.addresses("reviews.default")))
    assert d.up
    with source.lock:
        assert len(source.queries) >= 3  # two failures, then the answer


def test_stale_for_counts_from_the_last_answer_while_down(
    source: MemorySource, clock: FakeClock, started: Callable[..., Discovery]
) -> None:
    sink = RecordingSink()
    source.register(9001)
    d = started(source, sink, services=("reviews.default",), wait=10.0, clock=clock)
    sink.wait_for(lambda: bool(sink.addresses("reviews.default")))
    with source.lock:
        source.failures = [SourceUnavailable("down")] * 1000
    with source.lock:
        sent = len(source.queries)
    source.register(9002)  # wakes the held query: answered; the next request fails
    sink.wait_for(lambda: len(sink.addresses("reviews.default")) == 2)
    source.wait_queries(sent + 2)  # the failed request, then the retry: the failure is recorded
    assert not d.up
    clock.advance(42.0)
    assert d.stale_for() == pytest.approx(42.0)


def test_a_warming_registry_does_not_empty_a_cached_service(
    clock: FakeClock, started: Callable[..., Discovery]
) -> None:
    # The registry restarted empty (new epoch, warming): the cache file's endpoints stay.
    source = MemorySource(Registry("epoch-2", clock(), RegistrySettings(warming=10.0)), clock)
    cached = ServiceState(7, "epoch-1", (Endpoint("127.0.0.1:9001"), Endpoint("127.0.0.1:9002")))
    sink = RecordingSink()
    d = started(
        source,
        sink,
        services=("reviews.default",),
        initial=DiscoveryState("epoch-1", 0, "", {"reviews.default": cached}),
        wait=10.0,
    )
    source.wait_queries(3)  # the answer (refused), the reset's answer (refused), a held query
    assert sink.addresses("reviews.default") == ["127.0.0.1:9001", "127.0.0.1:9002"]
    with sink.cond:
        assert len(sink.calls) == 1 and sink.calls[0][2] is False  # only the cache's floor
    # Once authoritative, the registry's word is the set: one instance re-registered.
    clock.advance(10.0)
    source.register(9003)
    sink.wait_for(lambda: sink.addresses("reviews.default") == ["127.0.0.1:9003"])
    assert d.state().services["reviews.default"].epoch == "epoch-2"


def test_policy_loop_applies_new_versions_and_records_a_rejection(
    source: MemorySource, started: Callable[..., Discovery]
) -> None:
    sink = RecordingSink()
    with source.lock:
        source.registry.policy.propose("v1", author=ADMIN, if_match=None, now=0.0)
    d = started(source, sink, sink, wait=10.0)
    sink.wait_for(lambda: sink.policies == [1])
    assert d.policy_status.applied_version == 1
    sink.reject = "policy.yaml:3: bad"
    with source.lock:
        source.registry.policy.propose("v2", author=ADMIN, if_match=None, now=0.0)
    source.changed()
    sink.wait_for(lambda: sink.policies == [1, 2])
    source.wait_queries(3)  # version 1's query, version 2's, then the next: the NACK is recorded
    assert d.policy_status.rejected_version == 2
    assert d.policy_status.error == "policy.yaml:3: bad"
    assert d.state().policy_version == 1  # the last good policy stays


def test_stop_wakes_every_task_at_once(
    source: MemorySource, started: Callable[..., Discovery]
) -> None:
    sink = RecordingSink()
    slow = Pacing(first_jitter=0.0, backoff_base=300.0, backoff_cap=300.0)
    source.failures = [SourceUnavailable("down")]
    keys = tuple(f"svc{i}.default" for i in range(20))
    d = started(source, sink, sink, services=keys, wait=300.0, pacing=slow)
    source.wait_queries(len(keys))  # every loop has sent its first query: it holds or backs off
    assert d.running
    d.stop(timeout=2.0)
    assert not d.running


def test_the_cached_policy_is_applied_at_start_and_not_again_for_the_same_version(
    source: MemorySource, started: Callable[..., Discovery]
) -> None:
    sink = RecordingSink()
    with source.lock:
        source.registry.policy.propose("v1", author=ADMIN, if_match=None, now=0.0)
    d = started(source, sink, sink, initial=DiscoveryState("epoch-1", 1, "v1", {}), wait=10.0)
    assert sink.policies == [1]  # from the cache file, before the registry answered
    with source.lock:
        source.registry.policy.propose("v2", author=ADMIN, if_match=None, now=0.0)
    source.changed()
    sink.wait_for(lambda: sink.policies[-1] == 2)
    assert sink.policies == [1, 2]  # the registry's version 1 was not applied twice
    assert d.policy_status.applied_version == 2


def test_watch_after_stop_is_harmless(source: MemorySource) -> None:
    d = Discovery(source, RecordingSink(), pacing=FAST).start()
    d.stop()
    d.watch("late.default")
    assert not d.running and "late.default" in d.watched()


def test_each_applied_snapshot_is_persisted_to_the_cache_file(
    source: MemorySource, started: Callable[..., Discovery], tmp_path: Path
) -> None:
    cache = CacheFile(tmp_path / "discovery.json", "https://registry:8443", wall=lambda: 5.0)
    sink = RecordingSink()
    writes: list[int] = []

    def persist(state: DiscoveryState) -> None:  # the cache's write, then a signal to the test
        cache.write(state)
        with sink.cond:
            writes.append(len(state.services["reviews.default"].endpoints))
            sink.cond.notify_all()

    source.register(9001)
    started(source, sink, services=("reviews.default",), persist=persist, wait=10.0)
    sink.wait_for(lambda: writes == [1])
    source.register(9002)
    sink.wait_for(lambda: writes == [1, 2])
    loaded = cache.load()
    assert loaded is not None and loaded.state.epoch == "epoch-1"
    saved = loaded.state.services["reviews.default"]
    assert [e.address for e in saved.endpoints] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert saved.index == source.registry.index("default", "reviews")


def test_a_failing_sink_does_not_end_the_watch(
    source: MemorySource, started: Callable[..., Discovery]
) -> None:
    class Flaky(RecordingSink):
        def set_endpoints(
            self, service_key: str, endpoints: tuple[Endpoint, ...], *, authoritative: bool
        ) -> None:
            super().set_endpoints(service_key, endpoints, authoritative=authoritative)
            if len(self.calls) == 1:
                raise ValueError("a bug in the sink")

    sink = Flaky()
    source.register(9001)
    started(source, sink, services=("reviews.default",), wait=10.0)
    sink.wait_for(lambda: len(sink.calls) == 1)
    source.register(9002)
    sink.wait_for(lambda: len(sink.addresses("reviews.default")) == 2)


def test_an_answer_wakes_the_loops_still_backing_off(
    source: MemorySource, started: Callable[..., Discovery]
) -> None:
    # FAULT-6: after an outage each loop sleeps its own back-off, up to 30 s; once one loop of
    # the client hears from the registry, the others ask at once instead of staying stale.
    sink = RecordingSink()
    source.register(9001)
    source.register(9002, service="ratings")
    slow = Pacing(first_jitter=0.0, backoff_base=300.0, backoff_cap=300.0)
    source.failures = [SourceUnavailable("down"), SourceUnavailable("down")]
    d = started(source, sink, services=("reviews.default", "ratings.default"), pacing=slow)
    source.wait_queries(2)  # both loops failed: each sleeps up to 300 s
    assert not d.up
    d.watch("details.default")  # a new loop's first query is answered
    sink.wait_for(
        lambda: bool(sink.addresses("reviews.default")) and bool(sink.addresses("ratings.default"))
    )
    assert d.up


def test_after_a_failure_the_first_query_does_not_hold(
    source: MemorySource, started: Callable[..., Discovery]
) -> None:
    # FAULT-6: a loop back from an outage sent its old index with the full wait; the registry
    # held it (nothing had changed), so up stayed 0 and staleness grew for a whole wait after
    # the registry returned. The first query after a failure asks for an answer at once.
    sink = RecordingSink()
    source.register(9001)
    d = started(source, sink, services=("reviews.default",), wait=60.0)
    sink.wait_for(lambda: bool(sink.addresses("reviews.default")))
    source.wait_queries(2)  # the second query holds on the answer's index
    with source.lock:
        source.failures = [SourceUnavailable("down")]
        sent = len(source.queries)
    source.register(9002)  # ends the hold: the next request fails, the one after must not hold
    source.wait_queries(sent + 2)
    polled = threading.Event()
    for _ in range(250):  # bounded: 5 s
        if d.up:
            break
        polled.wait(0.02)
    assert d.up
    with source.lock:
        assert source.waits[sent + 1] == 0.0 and source.queries[sent + 1][1] > 0
