"""The registrar against the registry's real pure core: registers once, heartbeats keep the
instance alive across TTLs, a 404 registers again at once, a registry that is away is retried
with bounded, growing back-off, the policy NACK reaches the core, and close() drains, bounded.

The core runs behind an in-memory RegistrationAPI on a fake clock. The registrar's waits go to
a fake sleep that advances that clock (running the core's 1 s expiry tick on the way) and parks
the registrar's task once the test's condition holds: the test thread waits on an event, reads
the core while the task is parked, and releases it. No real time passes in a wait.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import pytest

from meshlib.control.loop import LoopThread
from meshlib.control.registrar import (
    Accepted,
    Failed,
    InstanceNotFound,
    Missing,
    PolicyReport,
    Registrar,
    RegistrarSettings,
    RegistrationHandle,
    RegistrationUnavailable,
    Renewed,
    Schedule,
    plan,
    retry_delay,
)
from meshlib.control.registry import Registry, RegistrySettings, instance_id

pytestmark = pytest.mark.timeout(20)

IDENTITY = "spiffe://shop.test/ns/default/sa/reviews"
TTL = 10.0
INTERVAL = 3.0  # what the registry answers for the default TTL
WAIT = 5.0  # bound on the test thread's waits for the registrar's task (never reached when green)


@dataclass(frozen=True)
class Answer:
    ttl: float
    heartbeat_interval: float


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0


class CoreAPI:
    """The registry's three instance calls over the real core, as the HTTP API maps them."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.core = Registry("epoch-1", clock.now, RegistrySettings(warming=0.0))
        self.calls: list[tuple[str, float]] = []
        self.down = False
        self.retry_after: float | None = None
        self.hang: set[str] = set()
        self.registered = threading.Event()

    async def _enter(self, verb: str) -> None:
        self.calls.append((verb, self.clock.now))
        if verb in self.hang:
            await asyncio.Event().wait()  # a registry that accepted the connection, then froze
        if self.down:
            raise RegistrationUnavailable("connect refused", self.retry_after)

    async def register(
        self,
        namespace: str,
        service: str,
        instance_id: str,
        address: str,
        port: int,
        labels: Mapping[str, str],
        metrics_port: int | None,
        ttl: float | None,
    ) -> Answer:
        await self._enter("register")
        done = self.core.register(
            namespace,
            service,
            address,
            port,
            labels=labels,
            metrics_port=metrics_port,
            identity=IDENTITY,
            ttl=ttl,
            now=self.clock.now,
        )
        assert done.instance.id == instance_id  # the API answers 400 otherwise
        self.registered.set()
        return Answer(done.instance.ttl, INTERVAL)

    async def heartbeat(
        self, namespace: str, service: str, instance_id: str, report: PolicyReport
    ) -> None:
        await self._enter("heartbeat")
        renewed = self.core.heartbeat(
            instance_id,
            self.clock.now,
            applied_version=report.applied_version,
            rejected_version=report.rejected_version,
            nack_error=report.error,
        )
        if not hasattr(renewed, "instance"):
            raise InstanceNotFound(f"instance {instance_id} is not registered: register again")

    async def deregister(self, namespace: str, service: str, instance_id: str) -> None:
        await self._enter("deregister")
        if not hasattr(self.core.drain(instance_id, self.clock.now), "instance"):
            raise InstanceNotFound(instance_id)

    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.calls]


class FakeSleep:
    """The registrar's wait: advances the clock by the delay, ticking the core's expiry every
    second as the registry app does, then parks the task while ``until()`` holds — at its first
    wait until the test calls :meth:`run_until`. Its state is read and written on the loop's
    thread only, so the test thread and the task never race on it."""

    def __init__(self, clock: Clock, api: CoreAPI, loop: LoopThread) -> None:
        self.clock, self.api, self.loop = clock, api, loop
        self.delays: list[float] = []
        self.until: Callable[[], bool] = lambda: True
        self.parked = threading.Event()
        #: Every task parked in this round waits on it; run_until opens it and makes the next.
        self._gate = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        end = self.clock.now + delay
        tick = float(int(self.clock.now) + 1)
        while tick < end:
            self.clock.now = tick
            self.api.core.expire(tick)
            tick += 1.0
        self.clock.now = end
        self.api.core.expire(end)
        if self.until():
            self.parked.set()
            await self._gate.wait()
        await asyncio.sleep(0)

    def run_until(self, condition: Callable[[], bool]) -> None:
        """Let the parked task go on until ``condition`` holds at one of its waits."""

        async def release() -> None:
            self.until = condition
            self.parked.clear()
            gate, self._gate = self._gate, asyncio.Event()
            gate.set()

        self.loop.submit(release()).result(WAIT)
        assert self.parked.wait(WAIT), "the registrar never reached the expected state"


@dataclass
class World:
    clock: Clock
    api: CoreAPI
    sleep: FakeSleep
    registrar: Registrar
    loop: LoopThread

    def close(self) -> None:
        self.registrar.close()
        self.loop.stop()

    def add(self, **kwargs: object) -> RegistrationHandle:
        return self.registrar.add("default", "reviews", "127.0.0.1", 9080, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def world() -> Iterator[World]:
    world = make_world()
    yield world
    world.close()


def make_world(
    report: Callable[[], PolicyReport] | None = None,
    settings: RegistrarSettings | None = None,
) -> World:
    """A registrar on a loop the test owns (so the fake sleep can be driven on it)."""
    clock = Clock()
    api = CoreAPI(clock)
    loop = LoopThread("test-registrar").start()
    sleep = FakeSleep(clock, api, loop)
    registrar = Registrar(
        api, report=report, settings=settings, rng=random.Random(11), sleep=sleep, loop=loop
    )
    return World(clock, api, sleep, registrar, loop)


ID = instance_id("default", "reviews", "127.0.0.1", 9080)


# -- the schedule, pure ---------------------------------------------------------------------


def test_plan_heartbeats_at_the_answered_interval_with_ten_percent_jitter() -> None:
    rng, settings = random.Random(1), RegistrarSettings()
    schedule, delay = plan(Schedule(), Accepted(2.0), rng, settings)
    assert schedule == Schedule(registered=True, interval=2.0, failures=0)
    delays = [delay] + [plan(schedule, Renewed(), rng, settings)[1] for _ in range(2000)]
    assert all(1.8 <= d <= 2.2 for d in delays)
    assert min(delays) < 1.85 and max(delays) > 2.15  # spread over the band, not a constant


def test_plan_registers_at_once_after_a_404_and_resets_failures() -> None:
    rng, settings = random.Random(2), RegistrarSettings()
    schedule = Schedule(registered=True, interval=3.0, failures=4)
    assert plan(schedule, Missing(), rng, settings) == (
        Schedule(registered=False, interval=3.0, failures=0),
        0.0,
    )


def test_plan_backs_off_growing_and_bounded_by_the_interval_then_recovers() -> None:
    rng, settings = random.Random(3), RegistrarSettings()
    schedule = Schedule(registered=True)
    delays = []
    for _ in range(12):
        schedule, delay = plan(schedule, Failed(), rng, settings)
        delays.append(delay)
    assert schedule.failures == 12 and schedule.registered  # still heartbeating, never gave up
    for failures, delay in enumerate(delays, start=1):
        ceiling = min(INTERVAL, 0.5 * 2 ** (failures - 1))
        assert ceiling / 2 <= delay <= ceiling
    schedule, delay = plan(schedule, Renewed(), rng, settings)
    assert schedule.failures == 0 and 2.7 <= delay <= 3.3


def test_retry_after_is_a_floor_bounded_by_its_cap() -> None:
    rng = random.Random(4)
    assert retry_delay(1, rng, base=0.5, cap=3.0, retry_after=5.0) == 5.0
    assert retry_delay(1, rng, base=0.5, cap=3.0, retry_after=3600.0, retry_after_cap=30.0) == 30.0
    assert retry_delay(1, rng, base=0.5, cap=3.0, retry_after=0.01) <= 0.5


def test_settings_and_reports_refuse_bad_values_naming_them() -> None:
    with pytest.raises(ValueError, match="drain_timeout"):
        RegistrarSettings(drain_timeout=0)
    with pytest.raises(ValueError, match="heartbeat_jitter"):
        RegistrarSettings(heartbeat_jitter=1.5)
    with pytest.raises(ValueError, match="rejected_version needs its error"):
        PolicyReport(rejected_version=3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"namespace": ""}, "namespace must be a non-empty name"),
        ({"service": "a/b"}, "service must be a non-empty name"),
        ({"port": 0}, r"port must be in 1\.\.65535, got 0"),
        ({"metrics_port": 70000}, "metrics_port must be in"),
        ({"ttl": 0.5}, r"ttl must be 1\.\.300 seconds, got 0\.5"),
    ],
)
def test_add_refuses_what_the_registry_would_refuse_naming_the_field(
    world: World, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {
        "namespace": "default",
        "service": "reviews",
        "address": "127.0.0.1",
        "port": 9080,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        world.registrar.add(**args)  # type: ignore[arg-type]
    assert world.registrar.handles == () and world.api.calls == []


# -- the driver against the core ------------------------------------------------------------


def test_registers_once_and_heartbeats_keep_it_alive_across_ttls(world: World) -> None:
    start = world.clock.now
    handle = world.add(labels={"version": "v2"}, metrics_port=9100)
    world.sleep.run_until(lambda: world.clock.now >= start + 5 * TTL)
    assert handle.id == ID
    assert world.api.verbs().count("register") == 1
    assert world.api.verbs().count("heartbeat") >= 5 * TTL / (INTERVAL * 1.1) - 1
    instance = world.api.core.get(ID)
    assert instance is not None and instance.labels == (("version", "v2"),)
    # never expired on the way: the service's index moved once, for the create
    assert world.api.core.index("default", "reviews") == 2
    assert all(INTERVAL * 0.9 <= d <= INTERVAL * 1.1 for d in world.sleep.delays)
    assert handle.status.registered and handle.status.failures == 0


@pytest.mark.parametrize("lost_by", ["expired", "restarted empty"])
def test_a_404_registers_again_at_once(world: World, lost_by: str) -> None:
    world.add()
    world.sleep.run_until(lambda: world.api.verbs().count("heartbeat") >= 2)
    if lost_by == "expired":  # silent for two TTLs (a paused process): the core expired it
        world.clock.now += 2 * TTL
        assert world.api.core.expire(world.clock.now)[0].id == ID
    else:
        world.api.core = Registry("epoch-2", world.clock.now)  # warming, empty
    assert world.api.core.get(ID) is None
    world.sleep.run_until(lambda: world.api.verbs().count("register") == 2)
    assert world.api.verbs()[-2:] == ["heartbeat", "register"]
    assert world.api.calls[-2][1] == world.api.calls[-1][1]  # no wait between 404 and register
    assert world.api.core.get(ID) is not None


def test_an_unavailable_registry_is_retried_with_bounded_growing_back_off(world: World) -> None:
    world.api.down = True
    handle = world.add()
    world.sleep.run_until(lambda: len(world.sleep.delays) >= 8)
    assert world.api.verbs() == ["register"] * 8  # never gave up
    for failures, delay in enumerate(world.sleep.delays, start=1):
        ceiling = min(INTERVAL, 0.5 * 2 ** (failures - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert handle.status.failures == 8 and not handle.status.registered
    assert handle.status.last_error == "RegistrationUnavailable: connect refused"
    world.api.down = False
    world.sleep.run_until(lambda: world.api.verbs().count("heartbeat") >= 1)
    assert world.api.core.get(ID) is not None
    assert handle.status.registered and handle.status.failures == 0
    assert INTERVAL * 0.9 <= world.sleep.delays[-1] <= INTERVAL * 1.1


def test_a_retry_after_is_honoured(world: World) -> None:
    world.api.down, world.api.retry_after = True, 7.0
    world.add()
    world.sleep.run_until(lambda: len(world.sleep.delays) >= 3)
    assert world.sleep.delays == [7.0, 7.0, 7.0]


def test_the_nack_and_its_error_reach_the_core_then_the_ack_clears_it() -> None:
    error = "policy.yaml:12: DestinationRule 'reviews': unknown field 'trafic'"
    reports = [PolicyReport(applied_version=3, rejected_version=4, error=error)]
    world = make_world(report=lambda: reports[-1])
    try:
        world.add()
        world.sleep.run_until(lambda: world.api.verbs().count("heartbeat") >= 1)
        instance = world.api.core.get(ID)
        assert instance is not None
        assert (instance.applied_version, instance.rejected_version) == (3, 4)
        assert instance.rejection == error
        reports.append(PolicyReport(applied_version=5))
        world.sleep.run_until(lambda: world.api.verbs().count("heartbeat") >= 2)
        instance = world.api.core.get(ID)
        assert instance is not None
        assert (instance.applied_version, instance.rejected_version, instance.rejection) == (
            5,
            None,
            None,
        )
    finally:
        world.close()


def test_a_failing_report_does_not_stop_the_heartbeats() -> None:
    def broken() -> PolicyReport:
        raise RuntimeError("report bug")

    world = make_world(report=broken)
    try:
        world.add()
        world.sleep.run_until(lambda: world.clock.now >= 1000.0 + 3 * TTL)
        assert world.api.core.get(ID) is not None
        assert world.api.verbs().count("register") == 1
    finally:
        world.close()


def test_close_drains_at_once_waking_the_heartbeat_wait(world: World) -> None:
    handle = world.add()
    world.sleep.run_until(lambda: world.api.verbs().count("heartbeat") >= 1)
    # the task is parked in its wait: close() must cancel it, not wait for it to end
    assert handle.close() is True
    assert world.api.core.get(ID) is None
    assert world.api.verbs()[-1] == "deregister"
    assert handle.status.drained is True and world.registrar.handles == ()
    assert handle.close() is True  # twice: the same answer, no second DELETE
    assert world.api.verbs().count("deregister") == 1


def test_close_is_bounded_when_the_registry_hangs() -> None:
    world = make_world(settings=RegistrarSettings(drain_timeout=0.2))
    try:
        handle = world.add()
        world.sleep.run_until(lambda: world.api.verbs().count("heartbeat") >= 1)
        world.api.hang.add("deregister")
        assert handle.close() is False  # gave up after drain_timeout, did not hang
        assert handle.status.drained is False
        assert world.api.core.get(ID) is not None  # left to its TTL
    finally:
        world.close()


def test_add_never_blocks_and_close_cancels_a_register_in_flight(world: World) -> None:
    world.api.hang.add("register")
    handle = world.add()  # returns while the register hangs
    assert not handle.status.registered
    assert handle.close() is True  # the DELETE's 404 means gone: done
    assert world.api.verbs() == ["register", "deregister"]


def test_closing_the_registrar_drains_every_instance_and_keeps_a_shared_loop() -> None:
    world = make_world()
    try:
        first = world.add()
        second = world.registrar.add("default", "reviews", "127.0.0.1", 9081)
        world.sleep.run_until(lambda: world.api.verbs().count("register") == 2)
        assert world.api.core.get(first.id) and world.api.core.get(second.id)
        assert world.registrar.close() is True
        assert world.api.core.instances() == ()
        assert world.loop.running  # shared: not the registrar's to stop
        with pytest.raises(RuntimeError, match="closed"):
            world.add()
    finally:
        world.close()
    assert not world.loop.running


def test_a_registrar_with_real_sleeps_stops_the_loop_it_started() -> None:
    api = CoreAPI(Clock())
    registrar = Registrar(api, rng=random.Random(5))  # its own loop, asyncio.sleep
    handle = registrar.add("default", "reviews", "127.0.0.1", 9080)
    assert api.registered.wait(WAIT)
    # the task now sleeps ~3 s for its first heartbeat: close must not wait for it
    assert registrar.close() is True
    assert api.core.get(handle.id) is None
    assert not any(t.name == "meshlib-registrar" for t in threading.enumerate())
