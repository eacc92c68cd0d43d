"""The registry app's consistency under store failures, the end of warming, its /metrics and its
readiness: a real uvicorn with strict mTLS over a SQLite store wrapped by a store that fails on
demand (no network mocked), a fake monotonic clock where time matters."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshlib.control.app import RegistryApp
from meshlib.control.memory import MemoryStore
from meshlib.control.registry import RegistrySettings
from meshlib.control.store import Put, Store, StoreError
from tests.control.conftest import TD, FakeClock, StartRegistry
from tests.control.fakes import ForwardingStore
from tests.control.test_app import POLICY, body, error_of, path

pytestmark = pytest.mark.timeout(30)


class FailingStore(ForwardingStore):
    """A store whose writes (put, delete) raise :class:`StoreError` while ``failing`` is set."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.failing = False
        self.refused = 0

    def _write(self, key: str) -> None:
        if self.failing:
            self.refused += 1
            raise StoreError(f"disk full writing {key} (test)")

    async def put(
        self, key: str, value: bytes, *, lease: int | None = None, if_mod_rev: int | None = None
    ) -> int:
        self._write(key)
        return await self.inner.put(key, value, lease=lease, if_mod_rev=if_mod_rev)

    async def put_all(self, puts: Sequence[Put]) -> int:
        self._write(puts[0][0])
        return await self.inner.put_all(puts)

    async def delete(self, key: str, *, if_mod_rev: int | None = None) -> int:
        self._write(key)
        return await self.inner.delete(key, if_mod_rev=if_mod_rev)


def answers(http: httpx.Client) -> dict[str, Any]:
    """Everything a reader of the registry sees (but the heartbeat ages, which time moves)."""
    instances = http.get("/v1/instances").json()["instances"]
    for each in instances:
        del each["last_heartbeat_age"]
    return {
        "reviews": http.get("/v1/services/default/reviews/endpoints").json(),
        "ratings": http.get("/v1/services/default/ratings/endpoints").json(),
        "services": http.get("/v1/services").json(),
        "instances": instances,
        "policy": http.get("/v1/policy").json(),
        "history": http.get("/v1/policy/history").json(),
    }


def test_a_failed_store_write_changes_nothing_and_asks_for_a_retry(
    registry_factory: StartRegistry,
) -> None:
    made: list[FailingStore] = []

    def wrap(store: Store) -> Store:
        made.append(FailingStore(store))
        return made[-1]

    clock = FakeClock()
    # two of two instances expiring is a mass loss: keep self-preservation out of the way
    settings = RegistrySettings(warming=0.0, preservation_min_instances=100)
    first = registry_factory(clock=clock, wrap=wrap, settings=settings)
    (store,) = made
    admin = first.http()
    assert admin.put(path("default", "reviews"), json=body(labels={"v": "1"})).status_code == 201
    assert admin.put(path("default", "ratings", port=9090), json=body(port=9090)).status_code == 201
    assert admin.put("/v1/policy", content=POLICY).status_code == 200
    assert admin.put("/v1/policy", content=POLICY.replace("9000", "9001")).status_code == 200
    before = answers(admin)
    assert before["reviews"]["index"] == 2 and before["policy"]["version"] == 2

    store.failing = True
    writes = {
        "register": lambda: admin.put(path("default", "reviews", port=8081), json=body(port=8081)),
        "update": lambda: admin.put(path("default", "reviews"), json=body(labels={"v": "2"})),
        "drain": lambda: admin.delete(path("default", "ratings", port=9090)),
        "report": lambda: admin.post(
            path("default", "reviews") + "/heartbeat", json={"applied_version": 2}
        ),
        "apply": lambda: admin.put("/v1/policy", content=POLICY.replace("9000", "9002")),
        "rollback": lambda: admin.post("/v1/policy/rollback", json={"version": 1}),
    }
    for verb, write in writes.items():
        failed = write()
        assert "store failed" in error_of(failed, 503)["error"], verb
        assert failed.headers["Retry-After"] == "1", verb
        assert answers(admin) == before, verb
    assert store.refused == len(writes)

    clock.advance(11.0)  # both instances' TTLs passed: an expiry pass must delete them
    with pytest.raises(StoreError):
        first.expire()
    assert answers(admin) == before

    first.stop()
    again = registry_factory(first.data, clock=FakeClock())
    assert answers(again.http()) == before


def test_the_end_of_warming_wakes_every_held_query(registry_factory: StartRegistry) -> None:
    clock = FakeClock()
    registry = registry_factory(clock=clock, settings=RegistrySettings(warming=10.0))
    admin = registry.http()
    admin.put(path("default", "reviews"), json=body(ttl=30))  # outlives the warming
    admin.put("/v1/policy", content=POLICY)
    first = admin.get("/v1/services/default/reviews/endpoints")
    assert first.headers["X-Mesh-Authoritative"] == "false"
    index = first.json()["index"]
    held = threading.Event()
    registry.app.on_watchers = lambda n: held.set() if n == 2 else None

    with ThreadPoolExecutor(2) as pool:
        endpoints = pool.submit(
            admin.get, f"/v1/services/default/reviews/endpoints?index={index}&wait=20s"
        )
        policy = pool.submit(admin.get, "/v1/policy?index=1&wait=20s")
        assert held.wait(10)
        clock.advance(9.0)
        assert registry.expire() == 0
        assert registry.app.wakeups == 0  # still warming: nothing to tell
        clock.advance(1.0)
        assert registry.expire() == 0  # the pass that sees warming end wakes them all
        woken = endpoints.result(5)
        woken_policy = policy.result(5)

    assert woken.headers["X-Mesh-Authoritative"] == "true"
    assert woken.json()["authoritative"] is True and woken.json()["index"] == index
    assert woken_policy.headers["X-Mesh-Authoritative"] == "true"
    assert woken_policy.json()["version"] == 1
    assert registry.app.wakeups == 2


def scrape(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = http.get("/metrics")
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def test_metrics_families_appear_and_move(registry_factory: StartRegistry) -> None:
    registry = registry_factory(metrics=True)
    writer = registry.http(registry.issue("default", "reviews"))
    start = scrape(writer)
    for family in (
        "mesh_registry_instances",
        "mesh_registry_watch_wakeups_total",
        "mesh_registry_self_preservation",
        "mesh_registry_blocking_queries",
    ):
        assert start[(family, ())] == 0, family
    assert "# TYPE mesh_registry_refusals_total counter" in writer.get("/metrics").text

    assert writer.put(path("default", "reviews"), json=body()).status_code == 201
    assert scrape(writer)[("mesh_registry_instances", ())] == 1

    held = threading.Event()
    registry.app.on_watchers = lambda n: held.set() if n == 1 else None
    with ThreadPoolExecutor(1) as pool:
        watching = pool.submit(
            writer.get, "/v1/services/default/reviews/endpoints?index=2&wait=20s"
        )
        assert held.wait(10)
        assert scrape(writer)[("mesh_registry_blocking_queries", ())] == 1
        writer.put(path("default", "reviews", port=8081), json=body(port=8081))
        assert len(watching.result(10).json()["endpoints"]) == 2
    moved = scrape(writer)
    assert moved[("mesh_registry_watch_wakeups_total", ())] == 1
    assert moved[("mesh_registry_instances", ())] == 2
    assert moved[("mesh_registry_blocking_queries", ())] == 0

    stranger = registry.http(registry.issue("default", "ratings"))
    error_of(stranger.put(path("default", "reviews", port=9), json=body(port=9)), 403)
    error_of(stranger.put("/v1/policy", content=POLICY), 403)
    refused = scrape(stranger)
    assert refused[("mesh_registry_refusals_total", (("verb", "register"),))] == 1
    assert refused[("mesh_registry_refusals_total", (("verb", "apply"),))] == 1
    assert error_of(stranger.post("/metrics"), 405)["error"].startswith("method POST")


def test_readyz_is_503_before_startup_and_after_shutdown() -> None:
    app = RegistryApp(
        MemoryStore(), trust_domain=TD, identify=lambda scope: f"spiffe://{TD}/ns/default/sa/a"
    )

    async def get(path: str) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
        sent: list[Any] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": []}
        await app(scope, receive, send)
        start, content = sent
        return (
            start["status"],
            json.loads(content["body"]),
            {k.lower(): v for k, v in start["headers"]},
        )

    async def lifecycle() -> None:
        assert (await get("/healthz"))[:2] == (200, {"ok": True})  # alive, not ready
        status, found, _ = await get("/readyz")
        assert status == 503 and "not open" in found["error"]
        status, found, headers = await get("/v1/status")
        assert status == 503 and found["error"] == "the registry is not started"
        assert headers[b"retry-after"] == b"1"
        await app.startup()
        assert (await get("/readyz"))[:2] == (200, {"ok": True})
        assert (await get("/v1/status"))[0] == 200
        await app.shutdown()
        status, found, _ = await get("/readyz")
        assert status == 503 and "not open" in found["error"]

    asyncio.run(lifecycle())
