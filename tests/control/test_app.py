"""The registry's HTTP API over a real uvicorn with strict mTLS and a SQLite store: the wire
format itself (raw httpx, one request per error status) and the rules behind it."""

from __future__ import annotations

import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from meshlib.control.registry import RegistrySettings, instance_id
from tests.control.conftest import TD, FakeClock, RunningRegistry, StartRegistry

pytestmark = pytest.mark.timeout(30)

POLICY = """apiVersion: meshlib/v1
kind: Mesh
metadata: {name: mesh}
spec: {trustDomain: shop.test}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  serviceAccount: reviews-sa
  endpoints: [{address: "127.0.0.1:9000"}]
"""
#: Three problems, on lines 4, 10 and 11 of bad.yaml.
BAD_POLICY = (
    POLICY.replace("reviews-sa", "")
    .replace("address", "adress")
    .replace("trustDomain: shop.test", "trustDomain: shop.test, bogus: 1")
)


def body(address: str = "127.0.0.1", port: int = 8080, **extra: Any) -> dict[str, Any]:
    return {"address": address, "port": port, **extra}


def path(ns: str, svc: str, address: str = "127.0.0.1", port: int = 8080) -> str:
    return f"/v1/instances/{ns}/{svc}/{instance_id(ns, svc, address, port)}"


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The JSON error body of an answer that must have ``status``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    found = response.json()
    assert isinstance(found["error"], str) and found["error"]
    return dict(found)


def test_register_is_idempotent_and_moves_the_index_only_on_change(
    registry: RunningRegistry,
) -> None:
    http = registry.http(registry.issue("default", "reviews"))
    first = http.put(path("default", "reviews"), json=body(labels={"version": "v1"}))
    assert first.status_code == 201
    assert first.json()["change"] == "created"
    assert first.json()["ttl"] == 10.0 and first.json()["heartbeat_interval"] == pytest.approx(
        3.333
    )
    again = http.put(path("default", "reviews"), json=body(labels={"version": "v1"}))
    assert again.status_code == 200
    assert again.json()["change"] == "refreshed"
    assert again.json()["index"] == first.json()["index"]
    moved = http.put(path("default", "reviews"), json=body(labels={"version": "v2"}))
    assert moved.json()["change"] == "updated"
    assert moved.json()["index"] == first.json()["index"] + 1

    answer = http.get("/v1/services/default/reviews/endpoints")
    assert answer.status_code == 200
    assert answer.headers["X-Mesh-Index"] == str(moved.json()["index"])
    assert answer.headers["X-Mesh-Authoritative"] == "true"
    epoch = answer.headers["X-Mesh-Epoch"]
    assert answer.headers["ETag"] == f'"{epoch}-{moved.json()["index"]}"'
    assert answer.json() == {
        "namespace": "default",
        "service": "reviews",
        "index": moved.json()["index"],
        "epoch": epoch,
        "authoritative": True,
        "endpoints": [
            {
                "id": instance_id("default", "reviews", "127.0.0.1", 8080),
                "address": "127.0.0.1",
                "port": 8080,
                "labels": {"version": "v2"},
                "metrics_port": None,
            }
        ],
    }
    listed = http.get("/v1/instances").json()["instances"]
    assert [i["identity"] for i in listed] == [f"spiffe://{TD}/ns/default/sa/reviews"]


def test_bad_requests_answer_json_naming_what_was_wrong(registry: RunningRegistry) -> None:
    http = registry.http(registry.issue("default", "reviews"))
    wrong = http.put("/v1/instances/default/reviews/0000000000000000", json=body())
    expected = instance_id("default", "reviews", "127.0.0.1", 8080)
    assert f"id must be {expected}" in error_of(wrong, 400)["error"]
    not_json = http.put(path("default", "reviews"), content=b"{nope")
    assert "not JSON" in error_of(not_json, 400)["error"]
    bad_type = http.put(path("default", "reviews"), json={"address": "127.0.0.1", "port": "8080"})
    assert "'port'" in error_of(bad_type, 400)["error"]
    bad_ttl = http.put(path("default", "reviews"), json=body(ttl=301))
    assert "'ttl'" in error_of(bad_ttl, 400)["error"]
    error_of(http.get("/v1/nothing"), 404)
    error_of(http.post("/v1/instances"), 405)
    big = http.put(path("default", "reviews"), content=b" " * (1024 * 1024 + 1))
    error_of(big, 413)
    error_of(http.delete(path("default", "reviews")), 404)


def test_heartbeat_renews_then_404s_after_expiry(registry_factory: StartRegistry) -> None:
    clock = FakeClock()
    registry = registry_factory(clock=clock)
    http = registry.http(registry.issue("default", "reviews"))
    assert http.put(path("default", "reviews"), json=body(ttl=2)).status_code == 201
    beat = http.post(path("default", "reviews") + "/heartbeat", json={"applied_version": 3})
    assert beat.status_code == 200 and beat.json() == {"ttl": 2.0}
    assert http.get("/v1/instances").json()["instances"][0]["applied_version"] == 3
    clock.advance(1.5)
    assert registry.expire() == 0
    assert http.post(path("default", "reviews") + "/heartbeat").status_code == 200
    clock.advance(2.5)
    assert registry.expire() == 1
    gone = http.post(path("default", "reviews") + "/heartbeat", content=b"")
    assert error_of(gone, 404)["error"].endswith("is not registered: register again")


def test_a_change_wakes_only_the_watchers_of_its_service(registry: RunningRegistry) -> None:
    http = registry.http(registry.issue("default", "reviews"))
    held = threading.Event()
    registry.app.on_watchers = lambda n: held.set() if n == 2 else None
    index = http.get("/v1/services/default/reviews/endpoints").json()["index"]

    with ThreadPoolExecutor(2) as pool:
        reviews = pool.submit(
            http.get, f"/v1/services/default/reviews/endpoints?index={index}&wait=20s"
        )
        ratings = pool.submit(
            http.get, f"/v1/services/default/ratings/endpoints?index={index}&wait=20s"
        )
        assert held.wait(10)
        assert registry.app.wakeups == 0
        http.put(path("default", "reviews"), json=body())
        woken = reviews.result(10)
        assert woken.json()["index"] == index + 1
        assert len(woken.json()["endpoints"]) == 1
        assert registry.app.wakeups == 1  # the ratings watcher was not woken...
        assert not ratings.done()  # ...and still waits
        admin = registry.http()
        admin.put(path("default", "ratings", port=9090), json=body(port=9090))
        assert ratings.result(10).json()["index"] == index + 1
    assert registry.app.wakeups == 2


def test_the_queries_one_change_wakes_share_one_encoded_answer(
    registry: RunningRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change to a service watched by N held queries built and encoded its answer N times
    (a fan-out to 200 watchers spent most of the registry's own CPU on that); now the first
    woken query encodes it and the others send the same bytes. A query not held builds its own,
    so nothing is served from a state older than the one it asks about."""
    from meshlib.control.wire import EndpointsAnswer, PolicyAnswer

    built = {"endpoints": 0, "policy": 0}
    for kind, cls in (("endpoints", EndpointsAnswer), ("policy", PolicyAnswer)):

        def counted(self: Any, _kind: str = kind, _to_json: Any = cls.to_json) -> Any:
            built[_kind] += 1
            return _to_json(self)

        monkeypatch.setattr(cls, "to_json", counted)
    admin = registry.http()
    admin.put("/v1/policy", content=POLICY)
    index = admin.get("/v1/services/default/reviews/endpoints").json()["index"]
    held = threading.Event()
    registry.app.on_watchers = lambda n: held.set() if n == 6 else None
    built.update(endpoints=0, policy=0)
    with ThreadPoolExecutor(6) as pool:
        reviews = [
            pool.submit(admin.get, f"/v1/services/default/reviews/endpoints?index={index}&wait=20s")
            for _ in range(3)
        ]
        policies = [pool.submit(admin.get, "/v1/policy?index=1&wait=20s") for _ in range(3)]
        assert held.wait(10)
        admin.put(path("default", "reviews"), json=body())
        admin.put("/v1/policy", content=POLICY.replace("9000", "9001"))
        endpoint_answers = [f.result(10) for f in reviews]
        policy_answers = [f.result(10) for f in policies]
    assert built == {"endpoints": 1, "policy": 1}
    assert len({a.content for a in endpoint_answers}) == 1
    assert endpoint_answers[0].json()["index"] == index + 1
    assert [e["port"] for e in endpoint_answers[0].json()["endpoints"]] == [8080]
    assert {a.headers["X-Mesh-Index"] for a in endpoint_answers} == {str(index + 1)}
    assert len({a.content for a in policy_answers}) == 1
    assert policy_answers[0].json()["version"] == 2
    assert {a.headers["X-Mesh-Index"] for a in policy_answers} == {"2"}

    admin.put(path("default", "reviews", port=8081), json=body(port=8081))
    fresh = admin.get("/v1/services/default/reviews/endpoints").json()
    assert [e["port"] for e in fresh["endpoints"]] == [8080, 8081]
    assert built["endpoints"] == 2


def test_bad_policy_is_refused_with_every_problem_and_never_becomes_a_version(
    registry: RunningRegistry,
) -> None:
    admin = registry.http()
    refused = admin.put("/v1/policy", content=BAD_POLICY, headers={"X-Mesh-Source": "bad.yaml"})
    problems = error_of(refused, 422)["problems"]
    assert len(problems) == 4
    assert [p.split(" ")[0].rsplit(":", 1)[0] for p in problems[:1]] == ["bad.yaml:4"]
    assert all(p.startswith("bad.yaml:") for p in problems)
    assert refused.json()["error"] == f"policy rejected: {problems[0]}"
    current = admin.get("/v1/policy")
    assert current.json()["version"] == 0 and current.json()["text"] == ""
    assert admin.get("/v1/policy/history").json() == {"versions": []}


def test_policy_versions_if_match_and_rollback(registry: RunningRegistry) -> None:
    admin = registry.http()
    first = admin.put("/v1/policy", content=POLICY, headers={"If-Match": '"0"'})
    assert first.status_code == 200
    assert first.json()["version"] == 1 and first.json()["changed"] is True
    same = admin.put("/v1/policy", content=POLICY)
    assert same.json() == {"version": 1, "digest": first.json()["digest"], "changed": False}
    second = admin.put(
        "/v1/policy", content=POLICY.replace("9000", "9001"), headers={"If-Match": "1"}
    )
    assert second.json()["version"] == 2
    stale = admin.put("/v1/policy", content=POLICY, headers={"If-Match": '"1"'})
    assert error_of(stale, 409) == {"error": "version conflict: current is 2", "current": 2}

    back = admin.post("/v1/policy/rollback", json={"version": 1})
    assert back.status_code == 200
    assert back.json() == {
        "version": 3,
        "rollback_of": 1,
        "digest": first.json()["digest"],
        "changed": True,
    }
    got = admin.get("/v1/policy")
    assert got.headers["X-Mesh-Index"] == "3" and got.headers["ETag"] == '"3"'
    assert got.json()["text"] == POLICY and got.json()["rollback_of"] == 1
    assert got.json()["author"] == f"spiffe://{TD}/ns/meshlib-system/sa/meshctl"
    assert admin.get("/v1/policy/versions/2").json()["text"] == POLICY.replace("9000", "9001")
    error_of(admin.get("/v1/policy/versions/9"), 404)
    error_of(admin.post("/v1/policy/rollback", json={"version": 9}), 404)
    history = admin.get("/v1/policy/history").json()["versions"]
    assert [v["version"] for v in history] == [1, 2, 3]
    assert "text" not in history[0]


def test_two_applies_with_the_same_if_match_one_wins(registry: RunningRegistry) -> None:
    """DATA-4: exactly one 200 and one 409, and only the winner's text is a version."""
    admin = registry.http()
    texts = [POLICY.replace("9000", str(9000 + n)) for n in (1, 2)]
    go = threading.Barrier(2)

    def apply(text: str) -> httpx.Response:
        go.wait(10)
        return admin.put("/v1/policy", content=text, headers={"If-Match": '"0"'})

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(apply, texts))
    assert sorted(a.status_code for a in answers) == [200, 409]
    winner = next(t for t, a in zip(texts, answers, strict=True) if a.status_code == 200)
    assert admin.get("/v1/policy").json()["text"] == winner
    assert len(admin.get("/v1/policy/history").json()["versions"]) == 1


def test_authorization_refuses_other_identities(registry: RunningRegistry) -> None:
    reviews = registry.http(registry.issue("default", "reviews"))
    refused = reviews.put(path("default", "ratings"), json=body())
    error = error_of(refused, 403)["error"]
    assert f"spiffe://{TD}/ns/default/sa/reviews" in error and "default/ratings" in error
    error_of(reviews.put(path("other", "reviews"), json=body()), 403)
    error_of(reviews.put("/v1/policy", content=POLICY), 403)
    error_of(reviews.post("/v1/policy/rollback", json={"version": 1}), 403)
    # the policy names reviews' account: the service name no longer may, the account may
    registry.http().put("/v1/policy", content=POLICY)
    error_of(reviews.put(path("default", "reviews"), json=body()), 403)
    account = registry.http(registry.issue("default", "reviews-sa"))
    assert account.put(path("default", "reviews"), json=body()).status_code == 201
    status = registry.http().get("/v1/status").json()
    assert status["refusals"] == registry.app.refusals == 5


def test_a_client_without_a_certificate_gets_health_and_403(registry: RunningRegistry) -> None:
    # TLS without a client certificate connects (a first contact has a join token, not an
    # SVID); the app serves it only the health checks (tests/control/test_sign.py walks all)
    no_cert = ssl.create_default_context(cafile=str(registry.admin_svid / "bundle.pem"))
    no_cert.check_hostname = False
    with httpx.Client(base_url=registry.url, verify=no_cert, timeout=5.0) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        error_of(anonymous.get("/v1/services"), 403)


def test_restart_with_data_keeps_epoch_instances_and_index(
    registry_factory: StartRegistry,
) -> None:
    first = registry_factory()
    http = first.http(first.issue("default", "reviews"))
    http.put(path("default", "reviews"), json=body())
    http.put(path("default", "reviews", port=8081), json=body(port=8081))
    http.delete(path("default", "reviews", port=8081))
    before = http.get("/v1/services/default/reviews/endpoints")
    first.http().put("/v1/policy", content=POLICY)
    first.stop()

    again = registry_factory(first.data, settings=RegistrySettings(warming=10.0))
    http = again.http(again.issue("default", "reviews-sa"))
    after = http.get("/v1/services/default/reviews/endpoints")
    assert after.headers["X-Mesh-Epoch"] == before.headers["X-Mesh-Epoch"]
    assert after.json()["index"] == before.json()["index"] == 4
    assert after.json()["endpoints"] == before.json()["endpoints"]
    assert after.headers["X-Mesh-Authoritative"] == "false"  # warming after the restart
    assert http.get("/v1/policy").json()["version"] == 1
    status = http.get("/v1/status").json()
    assert status["state"] == "warming" and status["store"].startswith("sqlite:")
    # the kept instance heartbeats straight on: it was not lost
    assert http.post(path("default", "reviews") + "/heartbeat").status_code == 200

    empty = registry_factory(settings=RegistrySettings(warming=10.0))
    fresh = empty.http().get("/v1/services/default/reviews/endpoints")
    assert fresh.headers["X-Mesh-Epoch"] != before.headers["X-Mesh-Epoch"]
    assert fresh.headers["X-Mesh-Authoritative"] == "false"
    assert fresh.json()["endpoints"] == [] and fresh.json()["index"] == 1


def test_blocking_queries_over_the_limit_get_429(registry_factory: StartRegistry) -> None:
    registry = registry_factory(max_watchers=1)
    http = registry.http()
    held = threading.Event()
    registry.app.on_watchers = lambda n: held.set() if n == 1 else None
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(http.get, "/v1/services/default/a/endpoints?index=1&wait=20s")
        assert held.wait(10)
        over = http.get("/v1/services/default/b/endpoints?index=1&wait=20")
        assert "too many blocking queries" in error_of(over, 429)["error"]
        assert over.headers["Retry-After"] == "1"
        # a query that answers at once is not held, so it is not limited
        assert http.get("/v1/services/default/b/endpoints").status_code == 200
        http.put(path("default", "a"), json=body())
        assert waiting.result(10).status_code == 200


def test_prometheus_sd_lists_instances_with_a_metrics_port(registry: RunningRegistry) -> None:
    admin = registry.http()
    admin.put(path("default", "reviews"), json=body(metrics_port=9100, labels={"version": "v2"}))
    admin.put(path("default", "ratings", port=8082), json=body(port=8082))
    groups = admin.get("/v1/sd/prometheus").json()
    assert groups == [
        {
            "targets": ["127.0.0.1:9100"],
            "labels": {
                "__meta_meshlib_namespace": "default",
                "__meta_meshlib_service": "reviews",
                "__meta_meshlib_instance": instance_id("default", "reviews", "127.0.0.1", 8080),
                "__meta_meshlib_label_version": "v2",
            },
        }
    ]


def test_status_health_and_services(registry: RunningRegistry) -> None:
    admin = registry.http()
    assert admin.get("/healthz").json() == {"ok": True}
    assert admin.get("/readyz").status_code == 200
    admin.put(path("default", "reviews"), json=body())
    assert admin.get("/v1/services").json() == {
        "services": [{"namespace": "default", "service": "reviews", "instances": 1, "index": 2}]
    }
    status = admin.get("/v1/status").json()
    assert status["state"] == "serving" and status["authoritative"] is True
    assert (status["instances"], status["services"], status["policy_version"]) == (1, 1, 0)
    assert status["watchers"] == 0 and len(status["epoch"]) == 16


def test_heartbeats_persist_at_most_every_third_of_a_ttl(registry_factory: StartRegistry) -> None:
    """FAULT-7's slack: after a restart an instance's TTL resumes from a beat at most ttl/3
    old, while most beats write nothing."""
    clock, wall = FakeClock(), FakeClock(1_800_000_000.0)
    first = registry_factory(clock=clock, wall=wall)
    http = first.http(first.issue("default", "reviews"))
    http.put(path("default", "reviews"), json=body(ttl=9))  # persisted at t=0
    for _ in range(5):  # t = 1..5: only the beat at t=3 (>= ttl/3 after 0) is written
        clock.advance(1)
        wall.advance(1)
        assert http.post(path("default", "reviews") + "/heartbeat").status_code == 200
    first.stop()

    again = registry_factory(first.data, clock=clock, wall=wall)
    listed = again.http().get("/v1/instances").json()["instances"]
    assert listed[0]["last_heartbeat_age"] == pytest.approx(2.0)  # the beat at t=3, not t=5
    assert listed[0]["last_heartbeat_age"] <= 9 / 3


def test_a_policy_query_is_held_until_a_new_version(registry: RunningRegistry) -> None:
    admin = registry.http()
    admin.put("/v1/policy", content=POLICY)
    held = threading.Event()
    registry.app.on_watchers = lambda n: held.set() if n == 1 else None
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(admin.get, "/v1/policy?index=1&wait=20s")
        assert held.wait(10)
        admin.put("/v1/policy", content=POLICY)  # the same text: no new version, no wake-up
        assert registry.app.wakeups == 0 and not waiting.done()
        admin.put("/v1/policy", content=POLICY.replace("9000", "9001"))
        answer = waiting.result(10)
    assert answer.headers["X-Mesh-Index"] == "2" and answer.json()["version"] == 2
    assert registry.app.wakeups == 1


def test_a_policy_over_the_loaders_cap_is_413(registry: RunningRegistry) -> None:
    from meshlib.config.loader import MAX_FILE_BYTES

    admin = registry.http()
    too_big = admin.put("/v1/policy", content=b"#" * (MAX_FILE_BYTES + 1))
    assert "limit" in error_of(too_big, 413)["error"]
    assert admin.get("/v1/policy").json()["version"] == 0
    error_of(admin.get("/v1/services/default/reviews/endpoints?index=x"), 400)
    error_of(admin.get("/v1/services/default/reviews/endpoints?index=1&wait=soon"), 400)
    error_of(admin.put("/v1/policy", content=POLICY, headers={"If-Match": "one"}), 400)


@pytest.mark.timeout(30)
def test_stop_answers_held_queries_before_the_graceful_shutdown_waits_on_them(
    registry: RunningRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """A long-poll held for its wait used to hold up uvicorn's graceful shutdown until the
    grace ran out and was then cancelled mid-answer (an ERROR log per held query)."""
    http = registry.http(registry.issue("default", "reviews"))
    held = threading.Event()
    registry.app.on_watchers = lambda n: held.set() if n == 2 else None
    index = http.get("/v1/services/default/reviews/endpoints").json()["index"]
    with ThreadPoolExecutor(2) as pool:
        endpoints = pool.submit(
            http.get, f"/v1/services/default/reviews/endpoints?index={index}&wait=60s"
        )
        other = pool.submit(
            http.get, f"/v1/services/default/ratings/endpoints?index={index}&wait=60s"
        )
        assert held.wait(10)
        with caplog.at_level("ERROR", logger="uvicorn.error"):
            registry.stop()
        for held_query in (endpoints.result(5), other.result(5)):
            assert held_query.status_code == 503  # the truth: back off, come back
            assert held_query.headers["retry-after"] == "1"
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
