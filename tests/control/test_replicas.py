"""Registry replicas over one shared store (replica mode): two apps on one MemoryStore and one
event loop, driven in-process through httpx's ASGI transport with an injected caller identity.
What one replica writes reaches the other's watchers; indexes, policy versions and expiries are
compare-and-sets, so racing replicas never hand out one index twice, never both win an If-Match
apply, and never expire an instance another replica just renewed; wake-ups are debounced; a store
that stops answering makes writes 503 and answers non-authoritative until it recovers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx
import pytest
from etcd_cluster import EtcdCluster

import meshlib.control.app as app_module
from meshlib.control.app import RegistryApp
from meshlib.control.etcd import EtcdStore
from meshlib.control.memory import MemoryStore
from meshlib.control.mirror import EPOCH_KEY, PREFIX
from meshlib.control.registry import RegistrySettings, instance_id
from meshlib.control.store import Conflict, Event, Item, Put, Store, StoreError, StoreUnavailable
from tests.control.conftest import TD, FakeClock
from tests.control.fakes import ForwardingStore
from tests.control.test_app import POLICY

pytestmark = pytest.mark.timeout(30)

ADMIN = f"spiffe://{TD}/ns/meshlib-system/sa/meshctl"
WALL0 = 1_700_000_000.0
EP = "/v1/services/default/reviews/endpoints"
_T = TypeVar("_T")


def ipath(port: int, address: str = "10.0.0.1") -> str:
    return f"/v1/instances/default/reviews/{instance_id('default', 'reviews', address, port)}"


def unavailable(operation: str) -> StoreError:
    return StoreUnavailable(operation, "no quorum (test)")


class Wrapped(ForwardingStore):
    """A view of the shared store for one replica: its watch can be held (``gate``: events wait
    until it is set), its writes' conflicts are counted, and ``down`` makes every call raise
    the store's "unavailable" error, as an etcd without quorum does."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()
        self.gate.set()
        self.down = False
        #: Set: the health probe (a range of the epoch key) gets no answer until it is cleared.
        self.stalled = False
        self.probed = asyncio.Event()
        self.conflicts = 0
        self.conflicted = asyncio.Event()
        #: Set: the watch in progress fails (a lost connection to etcd), as does each new one.
        self.cut = asyncio.Event()
        #: Set: a write answers only once this view's watch delivered its echo (as etcd may
        #: deliver a watch event before the write's own answer).
        self.echo_first = False
        self.delivered = 0
        self._delivery = asyncio.Event()
        #: The number of keys of each ``put_all`` asked of this view (before any failure).
        self.put_alls: list[int] = []

    async def _after_echo(self, revision: int) -> int:
        while self.echo_first and self.delivered < revision:
            self._delivery.clear()
            await self._delivery.wait()
        return revision

    def _check(self, operation: str) -> None:
        if self.down:
            raise unavailable(operation)

    async def range(self, prefix: str) -> tuple[int, list[Item]]:
        self._check("range")
        while self.stalled and prefix == EPOCH_KEY:
            self.probed.set()
            await asyncio.sleep(0.01)
        return await self.inner.range(prefix)

    async def _counted(self, write: Awaitable[_T]) -> _T:
        try:
            return await write
        except Conflict:
            self.conflicts += 1
            self.conflicted.set()
            raise

    async def put(
        self, key: str, value: bytes, *, lease: int | None = None, if_mod_rev: int | None = None
    ) -> int:
        self._check("put")
        put = self.inner.put(key, value, lease=lease, if_mod_rev=if_mod_rev)
        return await self._after_echo(await self._counted(put))

    async def put_all(self, puts: Sequence[Put]) -> int:
        self.put_alls.append(len(puts))
        self._check("put")
        return await self._after_echo(await self._counted(self.inner.put_all(puts)))

    async def delete(self, key: str, *, if_mod_rev: int | None = None) -> int:
        self._check("delete")
        delete = self.inner.delete(key, if_mod_rev=if_mod_rev)
        return await self._after_echo(await self._counted(delete))

    async def watch(self, prefix: str, after_rev: int) -> AsyncIterator[Event]:
        events = self.inner.watch(prefix, after_rev)
        cut = asyncio.ensure_future(self.cut.wait())
        following: asyncio.Future[Event] | None = None
        try:
            while True:
                following = asyncio.ensure_future(anext(events))
                await asyncio.wait({following, cut}, return_when=asyncio.FIRST_COMPLETED)
                if cut.done():
                    raise unavailable("watch")
                try:
                    event = following.result()
                except StopAsyncIteration:
                    return
                await self.gate.wait()
                yield event
                self.delivered = max(self.delivered, event.mod_revision)  # the mirror applied it
                self._delivery.set()
        finally:
            cut.cancel()
            if following is not None and not following.done():
                following.cancel()  # the inner generator must stop before it can be closed
                with contextlib.suppress(BaseException):
                    await following
            await events.aclose()  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self.inner.close()


class Replica:
    def __init__(self, app: RegistryApp, view: Wrapped, http: httpx.AsyncClient) -> None:
        self.app = app
        self.view = view
        self.http = http


@contextlib.asynccontextmanager
async def replicas(
    clock: FakeClock | None = None,
    debounce: tuple[float, float] | None = None,
    history: int = 1000,
    warming: float = 0.0,
) -> AsyncIterator[tuple[Replica, Replica, MemoryStore]]:
    """Replicas A and B over one MemoryStore; with ``clock``, both run on it (and the wall clock
    follows it), the tick is off and a test drives expiry and health checks itself."""
    shared = MemoryStore(history=history)
    clock = clock or FakeClock()
    made: list[Replica] = []
    for seed in (1, 2):
        view = Wrapped(shared)
        app = RegistryApp(
            view,  # type: ignore[arg-type]
            trust_domain=TD,
            identify=lambda scope: ADMIN,
            settings=RegistrySettings(warming=warming),
            clock=clock,
            wall=lambda: WALL0 + clock(),
            rng=random.Random(seed),
            tick=3600.0,
            replicas=True,
            debounce=debounce,
        )
        await app.startup()
        transport = httpx.ASGITransport(app=app)
        http = httpx.AsyncClient(transport=transport, base_url=f"http://replica-{seed}")
        made.append(Replica(app, view, http))
    try:
        yield made[0], made[1], shared
    finally:
        for each in made:
            await each.http.aclose()
            await each.app.shutdown()


async def caught_up(store: MemoryStore, *apps: RegistryApp) -> None:
    """Until every app's mirror has applied the store's latest revision, and every key at its
    revision (a registration's index and record share one revision) (bounded)."""
    revision, items = await store.range(PREFIX)
    for _ in range(10_000):
        if all(
            a.mirror is not None
            and a.mirror.revision >= revision
            and all(a.mirror.mod_revision(i.key) >= i.mod_revision for i in items)
            for a in apps
        ):
            return
        await asyncio.sleep(0)  # a turn of the loop: the mirror tasks apply what is queued
    raise AssertionError(f"mirrors never reached revision {revision}")


async def held_on(app: RegistryApp, count: int) -> None:
    """Until ``count`` blocking queries are held on ``app``."""
    reached = asyncio.Event()
    app.on_watchers = lambda n: reached.set() if n >= count else None
    if app.watchers < count:
        await asyncio.wait_for(reached.wait(), 10)


async def register(r: Replica, port: int, **extra: Any) -> httpx.Response:
    return await r.http.put(ipath(port), json={"address": "10.0.0.1", "port": port, **extra})


def ports(answer: httpx.Response) -> set[int]:
    return {e["port"] for e in answer.json()["endpoints"]}


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Until ``predicate()`` (the mirror's back-off runs on the real loop clock), bounded."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())


# -- mirroring -----------------------------------------------------------------------------------


def test_a_registration_through_a_reaches_a_query_held_on_b() -> None:
    async def main() -> None:
        async with replicas() as (a, b, _):
            first = await b.http.get(EP)
            index = first.json()["index"]
            held = asyncio.create_task(b.http.get(EP, params={"index": index, "wait": "20s"}))
            await held_on(b.app, 1)
            assert (await register(a, 9001)).status_code == 201
            answer = await asyncio.wait_for(held, 10)
            assert answer.json()["index"] > index
            assert ports(answer) == {9001}
            assert answer.headers["X-Mesh-Authoritative"] == "true"
            assert b.app.wakeups == 1

    run(main)


def test_a_drain_through_b_wakes_the_watchers_of_a() -> None:
    async def main() -> None:
        async with replicas() as (a, b, shared):
            assert (await register(a, 9001)).status_code == 201
            await caught_up(shared, a.app, b.app)
            index = (await a.http.get(EP)).json()["index"]
            held = asyncio.create_task(a.http.get(EP, params={"index": index, "wait": "20s"}))
            await held_on(a.app, 1)
            assert (await b.http.delete(ipath(9001))).status_code == 200
            answer = await asyncio.wait_for(held, 10)
            assert answer.json()["index"] == index + 1
            assert ports(answer) == set()
            assert a.app.wakeups == 1

    run(main)


def test_a_registration_is_one_store_write_of_its_index_and_record() -> None:
    """One round trip and one revision: no replica ever holds the index without its record."""

    async def main() -> None:
        async with replicas() as (a, b, shared):
            before, _ = await shared.range(PREFIX)
            assert (await register(a, 9001)).status_code == 201
            revision, items = await shared.range(PREFIX)
            assert revision == before + 1
            written = {
                i.key.split("/")[2]: i.mod_revision for i in items if i.mod_revision > before
            }
            assert written == {"indexes": revision, "instances": revision}
            await caught_up(shared, b.app)
            assert ports(await b.http.get(EP)) == {9001}

    run(main)


def test_a_burst_of_50_registrations_wakes_a_watcher_once_per_debounce_window() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with replicas(clock, debounce=(0.1, 1.0)) as (a, b, shared):
            held = asyncio.create_task(b.http.get(EP, params={"index": 1, "wait": "20s"}))
            await held_on(b.app, 1)
            for port in range(9000, 9050):
                assert (await register(a, port)).status_code == 201
            await caught_up(shared, b.app)
            assert not held.done() and b.app.wakeups == 0  # the window is still open
            clock.advance(0.1)  # quiet for 100 ms: the debounce task wakes the watcher
            answer = await asyncio.wait_for(held, 10)
            assert b.app.wakeups == 1
            assert answer.json()["index"] == 51  # one answer with all 50, not 50 answers
            assert len(ports(answer)) == 50

    run(main)


def test_writes_whose_echo_arrives_before_their_answer_are_committed_once() -> None:
    async def main() -> None:
        async with replicas() as (a, b, shared):
            a.view.echo_first = True
            assert (await register(a, 9001)).status_code == 201
            applied = await a.http.put("/v1/policy", content=POLICY)
            assert applied.status_code == 200, applied.text
            assert (await a.http.delete(ipath(9001))).status_code == 200
            await caught_up(shared, a.app, b.app)
            for r in (a, b):
                assert (await r.http.get("/v1/policy")).json()["version"] == 1
                answer = await r.http.get(EP)
                assert ports(answer) == set() and answer.json()["index"] == 3

    run(main)


def test_a_mirror_that_fell_behind_the_history_lists_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with replicas(history=4) as (a, b, shared):
            assert (await register(a, 9000)).status_code == 201
            await caught_up(shared, b.app)
            b.view.gate.clear()  # B's watch falls behind...
            for port in range(9001, 9006):
                assert (await register(a, port)).status_code == 201
            assert (await a.http.delete(ipath(9000))).status_code == 200
            index = (await a.http.get(EP)).json()["index"]
            b.view.gate.set()  # ...past the store's history: Compacted, and B lists again
            await caught_up(shared, b.app)
            answer = await b.http.get(EP)
            assert ports(answer) == set(range(9001, 9006))  # the drained one is gone too
            assert answer.json()["index"] == index
            assert answer.headers["X-Mesh-Authoritative"] == "true"

    run(main)
    assert "the mirror's watch was compacted: listing again" in caplog.text


# -- compare-and-sets ----------------------------------------------------------------------------


def test_two_replicas_racing_the_same_if_match_apply_exactly_one_wins() -> None:
    other = POLICY.replace("reviews-sa", "reviews-other")

    async def main() -> None:
        async with replicas() as (a, b, shared):
            b.view.gate.clear()  # B's mirror does not hear of A's version before B plans
            headers = {"If-Match": '"0"'}
            won = await a.http.put("/v1/policy", content=POLICY, headers=headers)
            lost = await b.http.put("/v1/policy", content=other, headers=headers)
            assert won.status_code == 200, won.text
            assert lost.status_code == 409, lost.text
            assert "version conflict" in lost.json()["error"]
            b.view.gate.set()
            await caught_up(shared, a.app, b.app)
            for r in (a, b):
                current = (await r.http.get("/v1/policy")).json()
                assert current["version"] == 1 and "reviews-sa" in current["text"]

    run(main)


def test_concurrent_registrations_through_both_replicas_get_distinct_increasing_indexes() -> None:
    async def main() -> None:
        async with replicas() as (a, b, shared):
            b.view.gate.clear()  # B plans on a mirror that has not seen A's registration
            first = await register(a, 9001)
            second_task = asyncio.create_task(register(b, 9002))
            await asyncio.wait_for(b.view.conflicted.wait(), 10)  # B lost the index CAS...
            b.view.gate.set()  # ...its mirror catches up and it plans again
            second = await asyncio.wait_for(second_task, 10)
            assert (first.status_code, second.status_code) == (201, 201), second.text
            assert first.json()["index"] == 2 and second.json()["index"] == 3
            await caught_up(shared, a.app, b.app)
            for r in (a, b):
                answer = await r.http.get(EP)
                assert ports(answer) == {9001, 9002} and answer.json()["index"] == 3

    run(main)


def test_an_instance_beating_through_a_is_not_expired_by_b() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with replicas(clock) as (a, b, shared):
            assert (await register(a, 9001, ttl=3)).status_code == 201
            assert (await register(a, 9002, ttl=3)).status_code == 201
            await caught_up(shared, a.app, b.app)
            for _ in range(9):  # 9 s, three TTLs: 9001 beats every second, 9002 is silent
                clock.advance(1.0)
                beat = await a.http.post(ipath(9001) + "/heartbeat")
                assert beat.status_code == 200, beat.text
                await caught_up(shared, b.app)
                await b.app.expire()
            await caught_up(shared, a.app, b.app)
            for r in (a, b):
                assert ports(await r.http.get(EP)) == {9001}

    run(main)


def test_an_expiry_loses_to_a_beat_its_mirror_had_not_seen() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with replicas(clock) as (a, b, shared):
            assert (await register(a, 9001, ttl=3)).status_code == 201
            await caught_up(shared, a.app, b.app)
            b.view.gate.clear()  # B does not hear of the beat...
            clock.advance(2.0)
            assert (await a.http.post(ipath(9001) + "/heartbeat")).status_code == 200
            clock.advance(1.5)  # ...so in B's mirror the TTL has passed
            assert await b.app.expire() == 0  # its delete's compare-and-set lost to the beat
            assert b.view.conflicts == 1
            b.view.gate.set()
            await caught_up(shared, a.app, b.app)
            _, items = await shared.range("/registry/instances/")
            assert len(items) == 1
            assert ports(await b.http.get(EP)) == {9001}

    run(main)


def test_a_beat_never_brings_back_a_record_another_replica_expired() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with replicas(clock) as (a, b, shared):
            assert (await register(a, 9001, ttl=3)).status_code == 201
            await caught_up(shared, a.app, b.app)
            a.view.gate.clear()  # A does not hear of the expiry...
            clock.advance(3.5)
            assert await b.app.expire() == 1
            beat = asyncio.create_task(a.http.post(ipath(9001) + "/heartbeat"))  # a late beat
            await asyncio.wait_for(a.view.conflicted.wait(), 10)  # its write lost...
            a.view.gate.set()  # ...it waits for A's mirror to show why, then answers 404
            assert (await asyncio.wait_for(beat, 10)).status_code == 404
            _, items = await shared.range("/registry/instances/")
            assert items == []
            await caught_up(shared, a.app)
            assert (await register(a, 9001, ttl=3)).status_code == 201  # a new index
            await caught_up(shared, a.app, b.app)
            answer = await b.http.get(EP)  # registered 2, expired 3, registered again 4
            assert ports(answer) == {9001} and answer.json()["index"] == 4

    run(main)


# -- persisted beats, group-committed -------------------------------------------------------------

BEATERS = range(9100, 9120)


async def twenty_due(a: Replica, b: Replica, shared: MemoryStore, clock: FakeClock) -> None:
    """20 instances registered through A, each beat now due to be persisted (its persisted beat
    older than ttl/3), A writing a batch once it holds 20 (its timer never fires first)."""
    for port in BEATERS:
        assert (await register(a, port, ttl=3)).status_code == 201
    await caught_up(shared, a.app, b.app)
    a.app.beat_batch_size = 20
    a.app.beat_batch_wait = 60.0
    a.view.put_alls.clear()
    clock.advance(1.5)


def beat_all(r: Replica) -> Awaitable[list[httpx.Response]]:
    return asyncio.gather(*(r.http.post(ipath(port) + "/heartbeat") for port in BEATERS))


def test_concurrent_beats_to_persist_are_one_store_write_that_the_other_replica_sees() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with replicas(clock) as (a, b, shared):
            await twenty_due(a, b, shared, clock)
            answers = await asyncio.wait_for(beat_all(a), 10)
            assert [r.status_code for r in answers] == [200] * 20
            assert a.view.put_alls == [20]  # one store write for the 20 records
            await caught_up(shared, a.app, b.app)
            for port in BEATERS:
                for r in (a, b):
                    core = r.app.registry
                    assert core is not None
                    beat = core.get(instance_id("default", "reviews", "10.0.0.1", port))
                    assert beat is not None and beat.last_heartbeat == pytest.approx(clock())

    run(main)


def test_a_record_moved_through_the_other_replica_fails_only_its_own_beat_in_a_batch() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with replicas(clock) as (a, b, shared):
            await twenty_due(a, b, shared, clock)
            a.view.gate.clear()  # A does not hear of B's write of 9105's record
            assert (await b.http.post(ipath(9105) + "/heartbeat")).status_code == 200
            beats = asyncio.ensure_future(beat_all(a))
            # the batch loses its compare-and-set, then 9105's own write loses too...
            await until(lambda: a.view.conflicts == 2)
            a.view.gate.set()  # ...and answers once A's mirror shows why
            answers = await asyncio.wait_for(beats, 10)
            codes = {port: r.status_code for port, r in zip(BEATERS, answers, strict=True)}
            assert codes == {port: 404 if port == 9105 else 200 for port in BEATERS}
            assert a.view.put_alls == [20]
            await caught_up(shared, a.app, b.app)
            _, items = await shared.range("/registry/instances/")
            assert len(items) == 20

    run(main)


def test_a_failing_store_answers_every_beat_of_the_batch_503() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with replicas(clock) as (a, b, shared):
            await twenty_due(a, b, shared, clock)
            core = a.app.registry
            assert core is not None
            before = {i.id: i.last_heartbeat for i in core.instances()}
            a.view.down = True
            answers = await asyncio.wait_for(beat_all(a), 10)
            assert [r.status_code for r in answers] == [503] * 20
            assert all(r.headers["Retry-After"] == "1" for r in answers)
            assert a.view.put_alls == [20]
            # plan, persist, commit: a refused batch leaves the core as it was
            assert {i.id: i.last_heartbeat for i in core.instances()} == before

    run(main)


# -- store health --------------------------------------------------------------------------------


def test_a_store_without_quorum_refuses_writes_and_marks_reads_until_it_recovers() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with replicas(clock) as (a, b, shared):
            assert (await register(a, 9001)).status_code == 201
            await caught_up(shared, a.app, b.app)
            index = (await b.http.get(EP)).json()["index"]
            held = asyncio.create_task(b.http.get(EP, params={"index": index, "wait": "20s"}))
            await held_on(b.app, 1)
            a.view.down = b.view.down = True
            assert await a.app.check_store() is False
            assert await b.app.check_store() is False
            woken = await asyncio.wait_for(held, 10)  # the answer's authoritative changed
            assert woken.headers["X-Mesh-Authoritative"] == "false"
            refused = await register(a, 9002)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            read = await a.http.get(EP)
            assert read.status_code == 200 and ports(read) == {9001}
            assert read.headers["X-Mesh-Authoritative"] == "false"
            status = (await a.http.get("/v1/status")).json()
            assert status["authoritative"] is False and status["replica"]["store_ok"] is False
            assert "store" in status["reason"]

            a.view.down = b.view.down = False
            assert await a.app.check_store() is True
            read = await a.http.get(EP)
            assert read.headers["X-Mesh-Authoritative"] == "true"
            assert (await register(a, 9002)).status_code == 201
            status = (await a.http.get("/v1/status")).json()
            assert status["authoritative"] is True and status["replica"]["store_ok"] is True

    run(main)


def test_a_probe_that_times_out_while_writes_commit_does_not_mark_the_store_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A restart storm holds a replica's event loop for seconds: its probe times out in the
    replica, not in the store, and writes keep committing. Refusing writes then was 503s."""
    monkeypatch.setattr(app_module, "HEALTH_TIMEOUT", 0.2)

    async def main() -> None:
        async with replicas() as (a, _, _):
            a.view.stalled = True
            probe = asyncio.create_task(a.app.check_store())
            await a.view.probed.wait()
            assert (await register(a, 9001)).status_code == 201  # the store answers
            assert await probe is True
            assert a.app.store_ok
            assert await a.app.check_store() is False  # a timeout and no write: down
            a.view.stalled = False
            assert await a.app.check_store() is True

    run(main)


def test_after_the_store_comes_back_a_replica_warms_before_it_expires() -> None:
    clock = FakeClock()

    async def main() -> None:
        async with replicas(clock, warming=3.0) as (a, b, shared):
            clock.advance(3.0)  # past the start's warming
            assert (await register(a, 9001, ttl=3)).status_code == 201
            await caught_up(shared, a.app, b.app)
            for r in (a, b):
                r.view.down = True
                assert await r.app.check_store() is False
            clock.advance(5.0)  # no beat could be taken meanwhile: 9001's TTL passed
            for r in (a, b):
                r.view.down = False
                assert await r.app.check_store() is True
            assert await b.app.expire() == 0  # warming again: nothing expires...
            status = (await b.http.get("/v1/status")).json()
            assert status["state"] == "warming" and status["authoritative"] is False
            for _ in range(3):  # ...while the instance beats again
                clock.advance(1.0)
                assert (await a.http.post(ipath(9001) + "/heartbeat")).status_code == 200
                await caught_up(shared, b.app)
                assert await b.app.expire() == 0
            status = (await b.http.get("/v1/status")).json()
            assert status["state"] == "serving" and status["authoritative"] is True
            assert ports(await b.http.get(EP)) == {9001}

    run(main)


def test_a_broken_watch_makes_answers_non_authoritative_until_it_resumes() -> None:
    async def main() -> None:
        async with replicas() as (a, b, shared):
            b.view.down = True  # B's watch breaks and its re-list fails
            b.view.cut.set()
            await until(lambda: not b.app.watch_ok)
            answer = await b.http.get(EP)
            assert answer.headers["X-Mesh-Authoritative"] == "false"
            assert (await register(b, 9001)).status_code == 503
            assert (await register(a, 9001)).status_code == 201  # A's store is fine
            b.view.down = False
            b.view.cut.clear()
            await until(lambda: b.app.watch_ok)  # the mirror lists again, then watches
            await caught_up(shared, b.app)
            answer = await b.http.get(EP)
            assert answer.headers["X-Mesh-Authoritative"] == "true"
            assert ports(answer) == {9001}  # what A wrote meanwhile came with the list
            assert (await register(b, 9002)).status_code == 201
            assert json.loads((await b.http.get("/v1/status")).text)["replica"]["watch_ok"]

    run(main)


# -- over a real etcd -----------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_replicas_over_a_real_etcd_share_writes_and_survive_its_loss(etcd: EtcdCluster) -> None:
    cluster = etcd
    policy_b = POLICY.replace("reviews-sa", "reviews-other")

    async def main() -> None:
        apps, clients = [], []
        for seed in (1, 2):
            app = RegistryApp(
                EtcdStore(cluster.endpoints, prefix="replicas/", timeout=0.5),
                trust_domain=TD,
                identify=lambda scope: ADMIN,
                settings=RegistrySettings(warming=0.0),
                rng=random.Random(seed),
                tick=3600.0,  # the test checks the store itself
                replicas=True,
                debounce=(0.05, 0.5),
            )
            await app.startup()
            apps.append(app)
            transport = httpx.ASGITransport(app=app)
            clients.append(httpx.AsyncClient(transport=transport, base_url=f"http://r{seed}"))
        a, b = clients
        try:
            held = asyncio.create_task(b.get(EP, params={"index": 1, "wait": "20s"}))
            await held_on(apps[1], 1)
            puts = [
                c.put(ipath(9000 + i), json={"address": "10.0.0.1", "port": 9000 + i})
                for i, c in enumerate([a, b] * 5)
            ]
            done = await asyncio.gather(*puts)
            assert [r.status_code for r in done] == [201] * 10, [r.text for r in done]
            assert sorted(r.json()["index"] for r in done) == list(range(2, 12))  # index CAS
            assert (await asyncio.wait_for(held, 10)).json()["index"] > 1
            for c in (a, b):
                await until_async(lambda c=c: c.get(EP), lambda r: len(ports(r)) == 10)

            headers = {"If-Match": '"0"'}
            race = await asyncio.gather(
                a.put("/v1/policy", content=POLICY, headers=headers),
                b.put("/v1/policy", content=policy_b, headers=headers),
            )
            assert sorted(r.status_code for r in race) == [200, 409], [r.text for r in race]

            cluster.nodes[0].kill()  # no quorum: no etcd at all
            for app in apps:
                assert await app.check_store() is False
            refused = await a.put(ipath(9100), json={"address": "10.0.0.1", "port": 9100})
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            read = await b.get(EP)
            assert len(ports(read)) == 10 and read.headers["X-Mesh-Authoritative"] == "false"

            cluster.nodes[0].start()
            for app in apps:
                await until_async(app.check_store, lambda ok: ok is True)
            # writes wait for the mirror too: it lists again after its watch broke
            await until(lambda: all(app.watch_ok for app in apps), timeout=20.0)
            back = await a.put(ipath(9100), json={"address": "10.0.0.1", "port": 9100})
            assert back.status_code == 201, back.text
            await until_async(lambda: b.get(EP), lambda r: len(ports(r)) == 11)
            assert (await b.get(EP)).headers["X-Mesh-Authoritative"] == "true"
        finally:
            for c in clients:
                await c.aclose()
            for app in apps:
                await app.shutdown()

    asyncio.run(main())  # the fixture stops etcd


async def until_async(
    call: Callable[[], Awaitable[_T]], ok: Callable[[_T], bool], timeout: float = 20.0
) -> _T:
    """Call ``call()`` until ``ok`` of its result (a real store answers in real time), bounded."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        result = await call()
        if ok(result):
            return result
        assert loop.time() < end, f"not reached in {timeout} s: {result!r}"
        await asyncio.sleep(0.05)
