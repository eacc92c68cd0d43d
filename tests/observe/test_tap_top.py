"""The tap's bounded buffers and the top aggregates, without sockets: drop counting, recent
then live without gaps, readers woken across threads and in asyncio, exact per-edge numbers
on a fake clock."""

from __future__ import annotations

import asyncio
import threading

import pytest
from policy.fakes import FakeClock

from meshlib.observe import CallEvent, Flag
from meshlib.observe.tap import DROP_NEWEST, Tap
from meshlib.observe.top import Top, percentile

pytestmark = pytest.mark.timeout(10)


def event(
    n: int = 0,
    *,
    destination: str = "reviews.default",
    flag: Flag = Flag.OK,
    duration: float = 0.01,
    direction: str = "outbound",
    route: str | None = None,
) -> CallEvent:
    return CallEvent(
        time=1000.0 + n,
        direction=direction,
        source="productpage.default",
        destination=destination,
        route=route,
        method="GET",
        authority=destination.split(".")[0],
        path=f"/{n}",
        status=200 if flag is Flag.OK else 503,
        code="200" if flag is Flag.OK else "503",
        duration=duration,
        flag=flag,
        reason=flag.value,
    )


def test_ring_keeps_the_last_events() -> None:
    tap = Tap(size=3)
    for n in range(5):
        tap(event(n))
    assert [e.path for e in tap.recent()] == ["/2", "/3", "/4"]


def test_subscription_drops_oldest_by_default_and_counts() -> None:
    tap = Tap()
    sub = tap.subscribe(size=2)
    for n in range(5):
        tap(event(n))
    assert sub.dropped == 3
    assert [sub.get(0).path, sub.get(0).path, sub.get(0)] == ["/3", "/4", None]  # type: ignore[union-attr]


def test_subscription_can_drop_new_events_instead() -> None:
    tap = Tap()
    sub = tap.subscribe(size=2, drop=DROP_NEWEST)
    for n in range(5):
        tap(event(n))
    assert sub.dropped == 3 and [sub.get(0).path, sub.get(0).path] == ["/0", "/1"]  # type: ignore[union-attr]


def test_recent_then_live_with_a_filter_and_unsubscribe() -> None:
    tap = Tap()
    tap(event(0))
    tap(event(1, destination="ratings.default"))
    sub = tap.subscribe(predicate=lambda e: e.destination == "reviews.default", recent=True)
    tap(event(2))
    tap(event(3, destination="ratings.default"))
    assert [sub.get(0).path, sub.get(0).path, sub.get(0)] == ["/0", "/2", None]  # type: ignore[union-attr]
    sub.close()
    assert tap.subscribers == 0


def test_a_thread_waiting_is_woken_by_an_event_from_another_thread() -> None:
    tap = Tap()
    sub = tap.subscribe()
    got: list[CallEvent | None] = []
    reader = threading.Thread(target=lambda: got.append(sub.get(timeout=5)))
    reader.start()
    while sub._waiter is None:  # the reader is parked (not a timing assumption: a state check)
        threading.Event().wait(0.001)
    tap(event(7))
    reader.join(5)
    assert [e.path for e in got if e] == ["/7"]


def test_an_asyncio_reader_is_woken_from_a_thread_and_times_out_empty() -> None:
    tap = Tap()
    sub = tap.subscribe()

    async def main() -> tuple[CallEvent | None, CallEvent | None]:
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(sub.next(timeout=5))
        while sub._waiter is None:
            await asyncio.sleep(0)
        await loop.run_in_executor(None, tap, event(9))
        first = await waiting
        second = await sub.next(timeout=0.01)
        return first, second

    first, second = asyncio.run(main())
    assert first is not None and first.path == "/9" and second is None


def test_many_threads_emitting_never_exceed_the_bound() -> None:
    tap = Tap(size=50)
    sub = tap.subscribe(size=10)
    threads = [
        threading.Thread(target=lambda: [tap(event(n)) for n in range(200)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(tap.recent()) == 50 and sub.dropped == 800 - 10
    assert len([sub.get(0) for _ in range(10)]) == 10 and sub.get(0) is None


def test_top_exact_counts_success_rate_and_percentiles() -> None:
    clock = FakeClock()
    top = Top(clock, window=10.0)
    for n in range(1, 101):
        top(event(n, duration=n / 1000.0))
    for n in range(4):
        top(event(n, flag=Flag.UPSTREAM_ERROR))
    top(event(0, destination="ratings.default", direction="inbound", route="get"))
    clock.advance(5.0)
    reviews, ratings = top.stats()
    assert (reviews.destination, reviews.requests, reviews.successes) == (
        "reviews.default",
        104,
        100,
    )
    assert reviews.success_rate == pytest.approx(100 / 104)
    assert reviews.rate == pytest.approx(104 / 5.0)  # observed for 5 s of a 10 s window
    # 1..100 ms plus four failures at 10 ms: ranks 52 and 103 of 104 (nearest rank)
    assert reviews.p50 == pytest.approx(0.048) and reviews.p99 == pytest.approx(0.099)
    assert (ratings.direction, ratings.route, ratings.requests) == ("inbound", "get", 1)


def test_top_forgets_samples_older_than_the_window() -> None:
    clock = FakeClock()
    top = Top(clock, window=10.0)
    top(event(1))
    clock.advance(6.0)
    top(event(2))
    clock.advance(6.0)
    (stats,) = top.stats()
    assert stats.requests == 1 and stats.rate == pytest.approx(0.1)
    clock.advance(10.0)
    assert top.stats() == []


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([1.0], 99) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([float(n) for n in range(1, 101)], 99) == 99.0
