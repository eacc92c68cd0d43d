"""The registry's pure core: idempotent register, heartbeats and TTL expiry, drain, the per-service
index, warming after a start, self-preservation bounded in time, and append-only policy versions
with If-Match (fake clock, no sockets)."""

from __future__ import annotations

import pytest
from policy.fakes import FakeClock

from meshlib.control.registry import (
    FIRST_INDEX,
    Change,
    Drained,
    Instance,
    NotFound,
    PolicyLog,
    PolicyVersion,
    Registration,
    Registry,
    RegistrySettings,
    RegistryState,
    Renewed,
    VersionConflict,
    instance_id,
    policy_digest,
)

NS = "default"
WORKLOAD = "spiffe://cluster.local/ns/default/sa/reviews"
ADMIN = "spiffe://cluster.local/ns/meshlib-system/sa/meshctl"
TTL = 10.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def warm(clock: FakeClock, **settings: float) -> Registry:
    """A registry past its warming period, so expiry runs."""
    registry = Registry("epoch-1", clock(), RegistrySettings(**settings))  # type: ignore[arg-type]
    clock.advance(registry.settings.warming)
    assert registry.authoritative(clock())
    return registry


def add(registry: Registry, clock: FakeClock, port: int, service: str = "reviews") -> Instance:
    done = registry.register(NS, service, "10.0.0.1", port, identity=WORKLOAD, now=clock())
    return done.instance


def renew_all(registry: Registry, clock: FakeClock, skip: frozenset[str] = frozenset()) -> None:
    for instance in registry.instances():
        if instance.id not in skip:
            assert isinstance(registry.heartbeat(instance.id, clock()), Renewed)


# -- register ------------------------------------------------------------------------------------


def test_instance_id_is_deterministic_and_documented() -> None:
    a = instance_id(NS, "reviews", "10.0.0.1", 8080)
    assert a == instance_id(NS, "reviews", "10.0.0.1", 8080)
    assert len(a) == 16 and int(a, 16) >= 0
    assert instance_id(NS, "Host.Example", "H.EXAMPLE", 1) == instance_id(
        NS, "Host.Example", "h.example", 1
    )
    others = {
        instance_id("other", "reviews", "10.0.0.1", 8080),
        instance_id(NS, "ratings", "10.0.0.1", 8080),
        instance_id(NS, "reviews", "10.0.0.2", 8080),
        instance_id(NS, "reviews", "10.0.0.1", 8081),
    }
    assert a not in others and len(others) == 4


def test_register_is_idempotent_and_only_a_change_moves_the_index(clock: FakeClock) -> None:
    registry = warm(clock)
    assert registry.index(NS, "reviews") == FIRST_INDEX
    first = registry.register(
        NS, "reviews", "10.0.0.1", 8080, labels={"v": "1"}, identity=WORKLOAD, now=clock()
    )
    assert first.change is Change.CREATED and first.index == FIRST_INDEX + 1
    assert first.instance.id == instance_id(NS, "reviews", "10.0.0.1", 8080)
    assert first.instance.ttl == TTL  # the default

    clock.advance(2.0)
    again = registry.register(
        NS, "reviews", "10.0.0.1", 8080, labels={"v": "1"}, identity=WORKLOAD, now=clock()
    )
    # identical data: a renewal, not a change, so no watcher wakes
    assert again == Registration(
        Instance(
            first.instance.id, NS, "reviews", "10.0.0.1", 8080, (("v", "1"),), None, WORKLOAD,
            TTL, registered_at=first.instance.registered_at, last_heartbeat=clock(),
        ),
        Change.REFRESHED,
        first.index,
    )  # fmt: skip
    assert registry.index(NS, "reviews") == first.index
    assert len(registry.instances()) == 1

    changed = registry.register(
        NS, "reviews", "10.0.0.1", 8080, labels={"v": "2"}, identity=WORKLOAD, now=clock()
    )
    assert changed.change is Change.UPDATED and changed.index == first.index + 1
    assert registry.endpoints(NS, "reviews", clock()).instances == (changed.instance,)


def test_register_refuses_bad_input_naming_the_field(clock: FakeClock) -> None:
    registry = warm(clock)
    cases = {
        "port": dict(port=0),
        "metrics_port": dict(metrics_port=70000),
        "ttl": dict(ttl=-1.0),
        "service": dict(service=""),
        "address": dict(address="a\nb"),
    }
    for field, bad in cases.items():
        args: dict[str, object] = dict(
            namespace=NS, service="reviews", address="10.0.0.1", port=80, identity=WORKLOAD
        )
        args.update(bad)
        with pytest.raises(ValueError, match=field):
            registry.register(now=clock(), **args)  # type: ignore[arg-type]
    assert registry.instances() == ()
    assert registry.index(NS, "reviews") == FIRST_INDEX


# -- heartbeats, expiry, drain -------------------------------------------------------------------


def test_heartbeat_renews_and_ttl_expires(clock: FakeClock) -> None:
    registry = warm(clock)
    instance = add(registry, clock, 8080)
    for _ in range(10):  # 30 s of heartbeats every 3 s: never expires
        clock.advance(3.0)
        assert isinstance(registry.heartbeat(instance.id, clock()), Renewed)
        assert registry.expire(clock()) == ()
    index = registry.index(NS, "reviews")
    assert registry.get(instance.id) is not None
    clock.advance(TTL - 0.001)
    assert registry.expire(clock()) == ()
    clock.advance(0.001)
    (expired,) = registry.expire(clock())
    assert expired.id == instance.id
    assert registry.endpoints(NS, "reviews", clock()).instances == ()
    assert registry.index(NS, "reviews") == index + 1


def test_heartbeat_after_expiry_is_not_found_and_re_register_works(clock: FakeClock) -> None:
    registry = warm(clock)
    instance = add(registry, clock, 8080)
    clock.advance(TTL)
    assert registry.expire(clock()) == (instance,)
    assert registry.heartbeat(instance.id, clock()) == NotFound(instance.id)
    again = add(registry, clock, 8080)
    assert again.id == instance.id
    assert isinstance(registry.heartbeat(again.id, clock()), Renewed)


def test_drain_removes_at_once(clock: FakeClock) -> None:
    registry = warm(clock)
    instance = add(registry, clock, 8080)
    before = registry.index(NS, "reviews")
    drained = registry.drain(instance.id, clock())
    assert drained == Drained(instance, before + 1)
    assert registry.endpoints(NS, "reviews", clock()).instances == ()
    assert registry.drain(instance.id, clock()) == NotFound(instance.id)
    assert registry.heartbeat(instance.id, clock()) == NotFound(instance.id)


def test_index_is_per_service_and_never_goes_backwards(clock: FakeClock) -> None:
    registry = warm(clock)
    a = add(registry, clock, 8080, "reviews")
    b_index = registry.index(NS, "ratings")
    seen = [registry.index(NS, "reviews")]
    add(registry, clock, 8081, "reviews")
    seen.append(registry.index(NS, "reviews"))
    registry.drain(a.id, clock())
    seen.append(registry.index(NS, "reviews"))
    clock.advance(TTL)
    registry.expire(clock())  # the last reviews instance expires: the service empties
    seen.append(registry.index(NS, "reviews"))
    add(registry, clock, 8080, "reviews")
    seen.append(registry.index(NS, "reviews"))
    assert seen == sorted(set(seen)), seen
    assert registry.index(NS, "ratings") == b_index  # a change to reviews never bumps ratings
    assert not registry.changed_since(NS, "ratings", b_index)
    assert registry.changed_since(NS, "reviews", seen[0])
    assert not registry.changed_since(NS, "reviews", seen[-1])
    assert registry.changed_since(NS, "reviews", seen[-1] + 100)  # from another epoch: reset
    answer = registry.endpoints(NS, "reviews", clock())
    assert (answer.index, answer.epoch, answer.authoritative) == (seen[-1], "epoch-1", True)


def test_an_expiry_pass_bumps_each_service_once(clock: FakeClock) -> None:
    registry = warm(clock)
    reviews = [add(registry, clock, port, "reviews") for port in (8080, 8081, 8082)]
    add(registry, clock, 9000, "ratings")
    for port in range(7000, 7020):
        add(registry, clock, port, "details")
    before = registry.index(NS, "reviews"), registry.index(NS, "ratings")
    dead = frozenset({reviews[1].id, reviews[2].id})  # 2 of 24: below the threshold
    clock.advance(TTL)
    renew_all(registry, clock, skip=dead)
    assert {i.id for i in registry.expire(clock())} == dead
    assert registry.index(NS, "reviews") == before[0] + 1  # two removals, one wake-up
    assert registry.index(NS, "ratings") == before[1]


# -- warming -------------------------------------------------------------------------------------


def test_warming_after_start_holds_expiry_for_one_ttl(clock: FakeClock) -> None:
    stored = Instance(
        instance_id(NS, "reviews", "10.0.0.1", 8080), NS, "reviews", "10.0.0.1", 8080, (), None,
        WORKLOAD, TTL, registered_at=clock() - 100, last_heartbeat=clock() - 30,
    )  # fmt: skip
    registry = Registry("epoch-1", clock(), instances=[stored], indexes={(NS, "reviews"): 7})
    assert registry.status(clock()).state is RegistryState.WARMING
    for _ in range(9):
        assert not registry.authoritative(clock())
        assert registry.expire(clock()) == ()  # it had no chance to heartbeat yet
        assert registry.endpoints(NS, "reviews", clock()).instances == (stored,)
        clock.advance(1.0)
    clock.advance(1.0)
    assert registry.authoritative(clock())
    assert registry.status(clock()).state is RegistryState.SERVING
    # TTLs resume from the persisted heartbeat: no free extra TTL for a silent instance
    assert registry.expire(clock()) == (stored,)
    assert registry.index(NS, "reviews") == 8  # watchers resume from the stored index


def test_warming_instance_that_heartbeats_stays(clock: FakeClock) -> None:
    registry = Registry("e", clock())
    assert not registry.endpoints(NS, "reviews", clock()).authoritative
    instance = add(registry, clock, 8080)  # re-registered after its 404
    clock.advance(registry.settings.warming)
    registry.heartbeat(instance.id, clock())
    assert registry.expire(clock()) == ()
    assert registry.endpoints(NS, "reviews", clock()).authoritative


# -- self-preservation ---------------------------------------------------------------------------


def fleet(clock: FakeClock, n: int = 50) -> Registry:
    registry = warm(clock)
    for port in range(1, n + 1):
        add(registry, clock, port)
    return registry


def test_single_expiries_happen_below_the_threshold(clock: FakeClock) -> None:
    """FAULT-9 (a): one instance of 50 stops heartbeating: it expires after its TTL."""
    registry = fleet(clock)
    dead = registry.instances()[0]
    expired: list[Instance] = []
    for _ in range(5):
        clock.advance(2.0)
        renew_all(registry, clock, skip=frozenset({dead.id}))
        expired += registry.expire(clock())
        assert registry.status(clock()).state is RegistryState.SERVING
    assert clock() == dead.deadline
    assert expired == [dead]


def test_one_missed_heartbeat_changes_nothing(clock: FakeClock) -> None:
    """FAULT-9 (b)."""
    registry = fleet(clock)
    late = registry.instances()[0]
    clock.advance(6.0)
    renew_all(registry, clock, skip=frozenset({late.id}))
    assert registry.expire(clock()) == ()
    registry.heartbeat(late.id, clock())
    assert registry.status(clock()).state is RegistryState.SERVING


def test_self_preservation_engages_on_mass_loss_and_leaves_when_it_ends(clock: FakeClock) -> None:
    """FAULT-9 (c): 30 % of instances lose their heartbeats at once, then come back."""
    registry = fleet(clock)
    cut = frozenset(i.id for i in registry.instances()[:15])
    for _ in range(15):  # 30 s of partition: three TTLs
        clock.advance(2.0)
        renew_all(registry, clock, skip=cut)
        assert registry.expire(clock()) == ()
    status = registry.status(clock())
    assert status.state is RegistryState.PRESERVING
    assert status.preserving_since is not None and status.reason is not None
    assert "15 of 50" in status.reason
    assert len(registry.instances()) == 50  # the held instances are still served
    renew_all(registry, clock)  # the partition heals: their heartbeats renew (no 404)
    assert registry.expire(clock()) == ()
    assert registry.status(clock()).state is RegistryState.SERVING
    assert registry.status(clock()).preserving_since is None


def test_self_preservation_is_bounded_in_time(clock: FakeClock) -> None:
    """Eureka's latch (Netflix/eureka#1073): a real mass death must expire, at the bound."""
    registry = fleet(clock)
    dead = frozenset(i.id for i in registry.instances()[:20])
    limit = registry.settings.preservation_limit
    engaged_at = None
    expired: tuple[Instance, ...] = ()
    while not expired:
        clock.advance(1.0)
        renew_all(registry, clock, skip=dead)
        expired = registry.expire(clock())
        if engaged_at is None and registry.status(clock()).preserving_since is not None:
            engaged_at = registry.status(clock()).preserving_since
        assert clock() < 1000.0 + 10 * limit, "self-preservation latched"
    assert engaged_at is not None
    assert clock() == engaged_at + limit
    assert {i.id for i in expired} == dead
    assert registry.status(clock()).state is RegistryState.SERVING
    # a second wave right after the bound: the loss ended (the dead are gone), so it re-arms
    second = frozenset(i.id for i in registry.instances()[:10])
    for _ in range(8):
        clock.advance(1.0)
        renew_all(registry, clock, skip=second)
        assert registry.expire(clock()) == ()
    assert registry.status(clock()).state is RegistryState.PRESERVING


def test_no_new_preservation_until_the_loss_ends(clock: FakeClock) -> None:
    """At the bound expiry resumes; instances still lapsing then must not latch it again."""
    registry = fleet(clock, 10)
    settings = registry.settings
    clock.advance(TTL * settings.lapse_fraction + 0.5)  # everyone silent past half a TTL
    assert registry.expire(clock()) == ()
    since = registry.status(clock()).preserving_since
    assert since == clock()
    # half re-register shortly before the bound: at the bound they have lapsed again
    clock.advance(settings.preservation_limit - 6.0)
    for port in range(1, 6):
        add(registry, clock, port)
    clock.advance(6.0 - 0.5)
    assert registry.expire(clock()) == ()
    clock.advance(0.5)
    assert clock() == since + settings.preservation_limit
    assert {i.port for i in registry.expire(clock())} == {6, 7, 8, 9, 10}
    assert registry.status(clock()).state is RegistryState.SERVING
    clock.advance(4.0)  # the re-registered half is overdue now, still a "mass": no new latch
    assert {i.port for i in registry.expire(clock())} == {1, 2, 3, 4, 5}
    assert registry.status(clock()).state is RegistryState.SERVING


def test_drain_works_while_preserving(clock: FakeClock) -> None:
    registry = fleet(clock, 10)
    clock.advance(TTL)
    assert registry.expire(clock()) == ()
    assert registry.status(clock()).state is RegistryState.PRESERVING
    victim = registry.instances()[0]
    assert isinstance(registry.drain(victim.id, clock()), Drained)
    assert registry.get(victim.id) is None


def test_a_clock_jump_expires_nothing(clock: FakeClock) -> None:
    """FAULT-9 (d): the registry's clock jumps by an hour; heartbeats then resume."""
    registry = fleet(clock)
    clock.advance(3600.0)
    assert registry.expire(clock()) == ()
    renew_all(registry, clock)
    assert registry.expire(clock()) == ()
    assert len(registry.instances()) == 50
    assert registry.status(clock()).state is RegistryState.SERVING


# -- policy reports from heartbeats --------------------------------------------------------------


def test_heartbeat_records_ack_and_nack(clock: FakeClock) -> None:
    registry = warm(clock)
    instance = add(registry, clock, 8080)
    before = registry.index(NS, "reviews")
    renewed = registry.heartbeat(instance.id, clock(), applied_version=3)
    assert isinstance(renewed, Renewed) and renewed.instance.applied_version == 3
    nacked = registry.heartbeat(
        instance.id,
        clock(),
        applied_version=3,
        rejected_version=4,
        nack_error="policy.yaml:12:5: spec.weight: must be >= 0",
    )
    assert isinstance(nacked, Renewed)
    assert (nacked.instance.applied_version, nacked.instance.rejected_version) == (3, 4)
    assert nacked.instance.rejection == "policy.yaml:12:5: spec.weight: must be >= 0"
    assert registry.get(instance.id) == nacked.instance
    # the report survives a re-register; a later ACK clears the rejection it supersedes
    again = add(registry, clock, 8080)
    assert (again.rejected_version, again.rejection) == (4, nacked.instance.rejection)
    acked = registry.heartbeat(instance.id, clock(), applied_version=5)
    assert isinstance(acked, Renewed)
    assert (acked.instance.applied_version, acked.instance.rejected_version) == (5, None)
    assert acked.instance.rejection is None
    assert registry.index(NS, "reviews") == before  # reports never wake endpoint watchers
    with pytest.raises(ValueError, match="nack_error"):
        registry.heartbeat(instance.id, clock(), rejected_version=6)


# -- policy versions -----------------------------------------------------------------------------


def test_if_match_lets_exactly_one_of_two_proposals_win(clock: FakeClock) -> None:
    log = PolicyLog()
    assert log.version == 0 and log.current() is None and log.changed_since(-1)
    first = log.propose("a: 1\n", author=ADMIN, if_match=0, now=clock())
    assert first == PolicyVersion(1, "a: 1\n", policy_digest("a: 1\n"), ADMIN, clock())
    one = log.propose("a: 2\n", author=ADMIN, if_match=1, now=clock())
    two = log.propose("a: 3\n", author=ADMIN, if_match=1, now=clock())
    assert isinstance(one, PolicyVersion) and one.version == 2
    assert two == VersionConflict(current=2)
    assert [v.text for v in log.history()] == ["a: 1\n", "a: 2\n"]
    assert log.changed_since(1) and not log.changed_since(2)
    assert log.propose("a: 3\n", author=ADMIN, if_match=2, now=clock()).version == 3  # type: ignore[union-attr]


def test_reproposing_the_current_text_makes_no_version(clock: FakeClock) -> None:
    log = PolicyLog()
    v1 = log.propose("a: 1\n", author=ADMIN, if_match=None, now=clock())
    assert log.propose("a: 1\n", author=ADMIN, if_match=1, now=clock()) == v1
    assert log.version == 1


def test_rollback_appends_a_new_version(clock: FakeClock) -> None:
    log = PolicyLog()
    for n in range(3):
        clock.advance(1.0)
        log.propose(f"a: {n}\n", author=ADMIN, if_match=n, now=clock())
    clock.advance(1.0)
    rolled = log.rollback(1, author=ADMIN, now=clock())
    assert rolled == PolicyVersion(4, "a: 0\n", policy_digest("a: 0\n"), ADMIN, clock(), 1)
    assert [v.version for v in log.history()] == [1, 2, 3, 4]
    assert log.history()[0].created_at == 1001.0  # the old version is untouched
    assert log.rollback(9, author=ADMIN, now=clock()) == NotFound("policy version 9")
    assert log.rollback(2, author=ADMIN, if_match=3, now=clock()) == VersionConflict(current=4)


def test_registry_loads_its_policy_history(clock: FakeClock) -> None:
    log = PolicyLog()
    log.propose("a: 1\n", author=ADMIN, if_match=0, now=clock())
    registry = Registry("e", clock(), policy=log.history())
    assert registry.policy.history() == log.history()
    broken = PolicyVersion(2, "x", policy_digest("x"), ADMIN, clock())
    with pytest.raises(ValueError, match="found version 2 at position 1"):
        PolicyLog([broken])


def test_bad_settings_and_stored_state_are_refused_naming_what(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="preservation_threshold"):
        RegistrySettings(preservation_threshold=1.5)
    with pytest.raises(ValueError, match="default_ttl"):
        RegistrySettings(default_ttl=0.0)
    with pytest.raises(ValueError, match="epoch"):
        Registry("", clock())
    forged = Instance(
        "0123456789abcdef", NS, "reviews", "10.0.0.1", 8080, (), None, WORKLOAD, TTL, 0.0, 0.0
    )
    with pytest.raises(
        ValueError, match="should have id '" + instance_id(NS, "reviews", "10.0.0.1", 8080)
    ):
        Registry("e", clock(), instances=[forged])
    with pytest.raises(ValueError, match="default/reviews"):
        Registry("e", clock(), indexes={(NS, "reviews"): 0})


def test_a_plan_changes_nothing_until_committed() -> None:
    registry = Registry("e1", 0.0, RegistrySettings(warming=0.0))
    plan = registry.plan_register(
        "default", "reviews", "10.0.0.1", 80, identity="spiffe://x", now=1.0
    )
    assert plan.change is Change.CREATED and plan.index == 2
    assert registry.instances() == () and registry.index("default", "reviews") == 1
    registry.commit(plan)
    assert registry.instances() == (plan.instance,) and registry.index("default", "reviews") == 2

    drain = registry.plan_drain(plan.instance.id, 2.0)
    assert isinstance(drain, Drained) and drain.index == 3
    assert registry.get(plan.instance.id) == plan.instance
    registry.commit(drain)
    assert registry.get(plan.instance.id) is None and registry.index("default", "reviews") == 3

    log = registry.policy
    version = log.plan_propose("a: 1", author="spiffe://x", if_match=0, now=5.0)
    assert isinstance(version, PolicyVersion) and log.version == 0
    log.commit(version)
    assert log.current() == version
    with pytest.raises(ValueError, match="not the next one"):
        log.commit(version)
