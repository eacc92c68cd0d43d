"""The registry client against a real registry (uvicorn, strict mTLS, SQLite): one method per
endpoint, wire values back, typed errors, the registry's SPIFFE ID pinned."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshlib.cli.registry import RegistryServed
from meshlib.control.client import (
    AsyncRegistryClient,
    PolicyRejected,
    RegistryClient,
    RegistryConflict,
    RegistryError,
    RegistryNotFound,
    RegistryRefused,
    RegistryUnavailable,
)
from meshlib.control.registry import instance_id
from meshlib.control.wire import (
    CLIENT_KEEP_ALIVE,
    SERVER_KEEP_ALIVE,
    InstanceInfo,
    RegisteredEndpoint,
    RegistryStatusInfo,
    ReplicaHealth,
    ServiceInfo,
    WireError,
)
from meshlib.inbound.serving import serve
from tests.control.conftest import TD, RunningRegistry, StartRegistry
from tests.control.test_app import BAD_POLICY, POLICY

pytestmark = pytest.mark.timeout(30)


def test_instances_and_discovery_through_the_client(registry: RunningRegistry) -> None:
    client = registry.client(registry.issue("default", "reviews"))
    made = client.register("default", "reviews", "127.0.0.1", 8080, labels={"version": "v1"})
    assert (made.change, made.ttl, made.heartbeat_interval) == ("created", 10.0, 3.333)
    assert made.id == instance_id("default", "reviews", "127.0.0.1", 8080)
    assert (
        client.register("default", "reviews", "127.0.0.1", 8080, labels={"version": "v1"}).change
        == "refreshed"
    )

    answer = client.endpoints("default", "reviews")
    assert answer.index == made.index and answer.authoritative
    assert answer.key == "reviews.default"
    assert answer.endpoints == (
        RegisteredEndpoint(made.id, "127.0.0.1", 8080, {"version": "v1"}, None),
    )
    assert client.heartbeat("default", "reviews", made.id, applied_version=1) == 10.0
    (instance,) = client.instances()
    assert (instance.id, instance.applied_version, instance.labels) == (
        made.id,
        1,
        {"version": "v1"},
    )
    assert client.services() == (ServiceInfo("default", "reviews", 1, made.index),)

    held = threading.Event()
    registry.app.on_watchers = lambda n: held.set() if n == 1 else None
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.endpoints, "default", "reviews", index=made.index, wait=20)
        assert held.wait(10)
        drained = client.deregister("default", "reviews", made.id)
        assert drained == made.index + 1
        assert waiting.result(10).endpoints == ()
    assert client.deregister("default", "reviews", made.id) is None  # 404: already done
    with pytest.raises(RegistryNotFound) as gone:
        client.heartbeat("default", "reviews", made.id)
    assert gone.value.status == 404 and "register again" in gone.value.message


def test_policy_through_the_client(registry: RunningRegistry) -> None:
    admin = registry.client()
    assert admin.policy().version == 0
    with pytest.raises(PolicyRejected) as rejected:
        admin.apply(BAD_POLICY, source="bad.yaml")
    assert len(rejected.value.problems) == 4
    assert rejected.value.problems[0].startswith("bad.yaml:4:")
    applied = admin.apply(POLICY, if_match=0)
    assert (applied.version, applied.changed) == (1, True)
    with pytest.raises(RegistryConflict) as conflict:
        admin.apply(POLICY.replace("9000", "9001"), if_match=0)
    assert conflict.value.current == 1
    got = admin.policy(index=0)
    assert (got.version, got.text, got.digest) == (1, POLICY, applied.digest)
    assert got.epoch == admin.status().epoch and got.authoritative
    admin.apply(POLICY.replace("9000", "9001"))
    back = admin.rollback(1, if_match=2)
    assert (back.version, back.rollback_of) == (3, 1)
    assert [v.version for v in admin.history()] == [1, 2, 3]
    assert admin.version(2).text == POLICY.replace("9000", "9001")
    with pytest.raises(RegistryNotFound):
        admin.version(7)


def test_refusals_and_limits_are_typed(registry_factory: StartRegistry) -> None:
    registry = registry_factory(max_watchers=1)
    reviews = registry.client(registry.issue("default", "reviews"))
    with pytest.raises(RegistryRefused) as refused:
        reviews.apply(POLICY)
    assert refused.value.status == 403 and f"spiffe://{TD}/ns/default/sa/reviews" in str(
        refused.value
    )
    with pytest.raises(RegistryError) as bad:
        reviews.register("default", "reviews", "127.0.0.1", 8080, ttl=0.5)
    assert bad.value.status == 400 and type(bad.value) is RegistryError

    held = threading.Event()
    registry.app.on_watchers = lambda n: held.set() if n == 1 else None
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(reviews.endpoints, "default", "a", index=1, wait=20)
        assert held.wait(10)
        with pytest.raises(RegistryUnavailable) as busy:
            reviews.endpoints("default", "b", index=1, wait=20)
        assert busy.value.status == 429 and busy.value.retry_after == 1.0
        registry.client().register("default", "a", "127.0.0.1", 8080)
        assert len(waiting.result(10).endpoints) == 1


def test_a_stopped_registry_is_unavailable(registry: RunningRegistry) -> None:
    client = registry.client()
    assert client.status().state == "serving"
    registry.server.stop()
    with pytest.raises(RegistryUnavailable) as down:
        client.status()
    assert down.value.status == 0 and down.value.retry_after is None


def test_the_client_pins_the_registry_id(registry: RunningRegistry) -> None:
    """A server with a valid SVID of the trust domain that is not the registry is refused
    before any request byte reaches it."""
    reached: list[Any] = []

    async def impostor(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope)

    workload = registry.issue("default", "reviews")
    with serve(
        impostor,
        mesh=RegistryServed(TD),
        svid_dir=str(workload),
        mode="strict",
        svid_poll_interval=None,
        lifespan="off",
    ) as server:
        client = RegistryClient(server.url, svid_dir=str(registry.admin_svid))
        with pytest.raises(RegistryUnavailable) as refused:
            client.status()
        client.close()
    assert f"spiffe://{TD}/ns/default/sa/reviews, not the registry" in str(refused.value)
    assert reached == []


@pytest.mark.anyio
async def test_the_async_client_shares_the_calls(registry: RunningRegistry) -> None:
    async with AsyncRegistryClient(registry.url, svid_dir=str(registry.admin_svid)) as client:
        made = await client.register("default", "reviews", "127.0.0.1", 8080, metrics_port=9100)
        assert made.change == "created"
        answer = await client.endpoints("default", "reviews", index=0)
        assert answer.endpoints[0].metrics_port == 9100
        assert (await client.prometheus_sd())[0]["targets"] == ["127.0.0.1:9100"]
        with pytest.raises(PolicyRejected):
            await client.apply(BAD_POLICY)
        assert (await client.apply(POLICY)).version == 1
        assert await client.deregister("default", "reviews", made.id) == made.index + 1


def test_typed_answers_round_trip_and_name_a_bad_field() -> None:
    instance = InstanceInfo(
        "abc", "default", "reviews", "127.0.0.1", 8080, {"v": "1"}, 9100, "spiffe://t/x", 10.0, 1.5
    )
    status = RegistryStatusInfo("e", "serving", None, True, 1, 1, 2, "memory", 3.0, 0, 0)
    for value in (instance, ServiceInfo("default", "reviews", 1, 4), status):
        assert type(value).from_json(value.to_json()) == value
    with pytest.raises(WireError, match=r"instances\[0\]: field 'port' has the wrong type"):
        InstanceInfo.from_json({**instance.to_json(), "port": "80"}, "instances[0]")
    with pytest.raises(WireError, match="field 'uptime_seconds' has the wrong type"):
        RegistryStatusInfo.from_json({**status.to_json(), "uptime_seconds": True})


def test_a_replica_status_carries_its_store_health_and_meshctl_shows_it() -> None:
    from meshlib.cli.registry_client import format_status

    lone = RegistryStatusInfo("e", "serving", None, True, 1, 1, 2, "memory", 3.0, 0, 0)
    assert "replica" not in lone.to_json()  # a lone registry's answer is as it always was
    assert "replica:" not in format_status(lone)
    failing = dataclasses.replace(
        lone,
        authoritative=False,
        store="etcd:http://127.0.0.1:2379",
        replica=ReplicaHealth(False, True),
    )
    assert failing.to_json()["replica"] == {"store_ok": False, "watch_ok": True}
    assert RegistryStatusInfo.from_json(failing.to_json()) == failing
    assert "replica:        store FAILING (writes answer 503), watch ok" in format_status(failing)
    with pytest.raises(WireError, match="replica: field 'watch_ok' has the wrong type"):
        RegistryStatusInfo.from_json(
            {**failing.to_json(), "replica": {"store_ok": True, "watch_ok": 1}}
        )


@pytest.mark.timeout(30)
def test_a_client_on_a_live_source_presents_the_svid_loaded_now(
    registry: RunningRegistry, tmp_path: Any
) -> None:
    """The registry link of a mesh shares the mesh's SVID source, which rotation reloads: a
    new connection presents the renewed SVID (a private source read once would keep the first
    one until it expired, and every registry call would then fail)."""
    import shutil

    from meshlib.control.client import RegistryClient
    from meshlib.identity.tls import SVIDSource

    live = tmp_path / "live"
    shutil.copytree(registry.issue("default", "reviews"), live)
    source = SVIDSource(live)
    client = RegistryClient(registry.url, source=source)
    try:
        assert client.instances() == ()
        first = source.material.certificate.serial_number
        renewed = registry.dir.issue("default", "reviews", tmp_path / "renewed")
        for name in ("cert.pem", "key.pem"):
            shutil.copy(renewed / name, live / name)
        assert source.reload()
        assert source.material.certificate.serial_number != first
        # the context the client's next connection is made with carries the renewed pair
        assert client.check.client_context() is source.current_client_context()
        assert client.instances() == ()
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_the_async_client_holds_more_long_polls_than_httpxs_default_pool(
    registry: RunningRegistry,
) -> None:
    """Discovery holds one long-poll per watched service on one async client: httpx's default
    pool (100 connections, 20 kept alive) queued the 101st watch behind the others and closed
    all but 20 connections after each answer (a new mutual-TLS handshake per re-poll)."""
    import asyncio

    from meshlib.control.client import AsyncRegistryClient

    count = 110
    held = threading.Event()
    registry.app.on_watchers = lambda n: held.set() if n >= count else None

    async def run() -> int:
        client = AsyncRegistryClient(registry.url, svid_dir=str(registry.admin_svid))
        try:
            polls = [
                asyncio.ensure_future(client.endpoints("default", f"s{i}", index=1, wait=30.0))
                for i in range(count)
            ]
            reached = await asyncio.to_thread(held.wait, 20)
            registry.app.release()  # answer them all now (503), as a stopping registry does
            await asyncio.gather(*polls, return_exceptions=True)
            return count if reached else registry.app.watchers
        finally:
            await client.aclose()

    assert asyncio.run(run()) == count


def _established(port: int) -> int:
    """The TCP connections the server listening on ``port`` holds open (its side: the local
    port is ``port``), read from the kernel's table."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _remote, state = line.split()[1:4]
        if int(local.rsplit(":", 1)[1], 16) == port and state == "01":  # 01: ESTABLISHED
            count += 1
    return count


@pytest.mark.timeout(30)
def test_an_idle_connection_outlives_the_default_5_s_keep_alive_and_the_client_lets_go_first(
    registry: RunningRegistry,
) -> None:
    """uvicorn and httpx both keep an idle connection 5 s by default: a beat sent just under 5 s
    after the last one raced the server's close ("Server disconnected"), and one sent after it
    paid a new mutual-TLS handshake. The registry keeps idle connections longer than clients do."""
    assert CLIENT_KEEP_ALIVE < SERVER_KEEP_ALIVE

    def local_port(response: httpx.Response) -> int:
        port: int = response.extensions["network_stream"].get_extra_info("socket").getsockname()[1]
        return port

    limits = httpx.Limits(keepalive_expiry=CLIENT_KEEP_ALIVE)  # the registry clients' setting
    http = registry.http(limits=limits)
    first = local_port(http.get("/v1/status"))
    time.sleep(5.5)  # the property is time passing: past uvicorn's default 5 s keep-alive
    assert local_port(http.get("/v1/status")) == first, "a new connection: the server closed it"


@pytest.mark.anyio
@pytest.mark.timeout(30)
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
async def test_a_burst_of_calls_opens_at_most_max_connections(registry: RunningRegistry) -> None:
    port = int(registry.url.rsplit(":", 1)[1])
    async with AsyncRegistryClient(
        registry.url, svid_dir=str(registry.admin_svid), max_connections=3
    ) as client:
        # A held query has a connection of its own: the burst does not queue behind it.
        watch = asyncio.create_task(client.endpoints("default", "ratings", index=1, wait=20.0))
        made = await asyncio.gather(
            *(client.register("default", "reviews", "127.0.0.1", 8000 + n) for n in range(40))
        )
        assert sorted(m.change for m in made) == ["created"] * 40
        assert not watch.done()
        opened = _established(port)
        await client.register("default", "ratings", "127.0.0.1", 9000)
        assert [e.port for e in (await watch).endpoints] == [9000]
    # 3 for the calls, 1 for the held query (before the cap: one per concurrent call, 41)
    assert 2 <= opened <= 4, f"{opened} connections to the registry"
