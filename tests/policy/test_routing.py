"""Router over loaded snapshots: host resolution, route matching, splits, merged policy."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import ClassVar

import pytest

from meshlib.config.loader import load_text
from meshlib.config.model import (
    AbortFault,
    EffectivePolicy,
    FaultRule,
    PolicyTarget,
    ServiceDef,
    TrafficPolicyDoc,
)
from meshlib.policy.routing import Router
from meshlib.policy.split import pick_backend
from policy.fakes import binomial_bounds

POLICY = """
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {endpoints: [{address: "127.0.0.1:8001"}]}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews-v1, namespace: default}
spec: {endpoints: [{address: "127.0.0.1:8002"}]}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews-v2, namespace: default}
spec: {endpoints: [{address: "127.0.0.1:8003"}]}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec: {endpoints: [{address: "127.0.0.1:8004"}]}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: details, namespace: default}
spec: {endpoints: []}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: details-v2, namespace: default}
spec: {endpoints: [{address: "127.0.0.1:8005"}]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: ab-test, namespace: default}
spec:
  matches:
  - name: firefox-users
    headers: {user-agent: ".*Firefox.*"}
    pathRegex: "/reviews.*"
    methods: ["GET"]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: reviews-routes, namespace: default}
spec:
  matches:
  - name: admin
    pathRegex: "/admin"
    methods: ["*"]
  - name: writes
    methods: ["POST", "PUT"]
  - name: unused
    pathRegex: "/unused"
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: reviews-split, namespace: default}
spec:
  service: reviews
  backends: [{service: reviews-v1, weight: 50}, {service: reviews-v2, weight: 50}]
  matches: [{kind: HTTPRouteGroup, name: ab-test}]
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: details-split, namespace: default}
spec:
  service: details
  backends: [{service: details-v2, weight: 100}]
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: mesh-wide, namespace: default}
spec:
  timeout: 10s
  retries: {attempts: 1}
  circuitBreaker: {consecutiveFailures: 7}
  loadBalancer: {type: random}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: ns-default, namespace: default}
spec:
  target: {namespace: default}
  timeout: 5s
  circuitBreaker: {openDuration: 3s}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: reviews-policy, namespace: default}
spec:
  target: {service: reviews}
  timeout: 2s
  retries: {attempts: 3, retryOn: [5xx]}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: reviews-admin, namespace: default}
spec:
  target: {service: reviews, route: admin}
  timeout: 1s
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: reviews-writes, namespace: default}
spec:
  target: {service: reviews, route: writes}
  retries: {retryable: true}
"""

GET, POST = "GET", "POST"
FIREFOX = {"user-agent": "Mozilla/5.0 Firefox/120.0"}


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(load_text(POLICY))


def svc(router: Router, key: str) -> ServiceDef:
    return router.services[key]


# -- resolve ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "namespace", "expected"),
    [
        ("reviews", "default", "reviews.default"),
        ("REVIEWS", "default", "reviews.default"),
        ("reviews.default", "shop", "reviews.default"),
        ("reviews.default.svc", "shop", "reviews.default"),
        ("reviews.default.svc.cluster.local", "shop", "reviews.default"),
        ("reviews.default.svc.cluster.local.", "shop", "reviews.default"),
        ("ratings", "shop", "ratings.shop"),
        ("ratings.shop", "default", "ratings.shop"),
        ("ratings", "default", None),  # not in the caller's namespace
        ("reviews", "shop", None),
        ("unknown", "default", None),
        ("unknown.default", "default", None),
        ("example.com", "default", None),
        ("127.0.0.1", "default", None),
    ],
)
def test_resolve(router: Router, host: str, namespace: str, expected: str | None) -> None:
    found = router.resolve(host, namespace)
    assert (found.key if found else None) == expected
    assert router.resolve(host, namespace) is found  # cached, same answer


# -- route matching --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers", "route"),
    [
        (GET, "/reviews/1", FIREFOX, "firefox-users"),
        (GET, "/reviews", FIREFOX, "firefox-users"),
        (GET, "/api/reviews/1", FIREFOX, None),  # pathRegex is anchored at the start
        (GET, "/reviews/1", {"user-agent": "curl/8"}, None),
        (GET, "/reviews/1", {}, None),
        (POST, "/reviews/1", FIREFOX, "writes"),  # firefox-users is GET only
        (GET, "/admin", {}, "admin"),
        (GET, "/admin/users", {}, "admin"),
        (GET, "/x/admin", {}, None),
        ("DELETE", "/admin", {}, "admin"),  # methods: ["*"]
        ("PATCH", "/admin", {}, "admin"),
        (POST, "/anything", {}, "writes"),
        ("PUT", "/anything", {}, "writes"),
        ("DELETE", "/anything", {}, None),
        (GET, "/unused", {}, None),  # a match no split or policy names is not a route
    ],
)
def test_route_matching(
    router: Router, method: str, path: str, headers: dict[str, str], route: str | None
) -> None:
    match = router.route(svc(router, "reviews.default"), method, path, headers)
    assert match.name == route


def test_split_with_matches_applies_only_to_matching_requests(router: Router) -> None:
    reviews = svc(router, "reviews.default")
    matching = router.route(reviews, GET, "/reviews/1", FIREFOX)
    assert matching.split is not None and matching.split.name == "reviews-split"
    for method, path, headers in [
        (GET, "/reviews/1", {"user-agent": "curl/8"}),
        (GET, "/admin", FIREFOX),
        (POST, "/reviews/1", FIREFOX),
    ]:
        assert router.route(reviews, method, path, headers).split is None  # goes to the root


def test_split_shares_for_matching_requests(router: Router) -> None:
    match = router.route(svc(router, "reviews.default"), GET, "/reviews/1", FIREFOX)
    assert match.split is not None
    rng = random.Random(1)
    counts = Counter(pick_backend(match.split, rng) for _ in range(2000))
    low, high = binomial_bounds(2000, 0.5)
    assert low <= counts["reviews-v1.default"] <= high
    assert counts["reviews-v1.default"] + counts["reviews-v2.default"] == 2000


def test_split_without_matches_applies_to_every_request(router: Router) -> None:
    details = svc(router, "details.default")
    for method, path in [(GET, "/"), (POST, "/x"), ("DELETE", "/admin")]:
        match = router.route(details, method, path, {})
        assert match.split is not None and match.split.name == "details-split"
        assert match.name is None


def test_service_without_routes_or_split(router: Router) -> None:
    match = router.route(svc(router, "ratings.shop"), GET, "/", {})
    assert match.name is None and match.split is None
    assert not router.has_routes("ratings.shop")
    assert router.has_routes("reviews.default")


# -- merged policy ---------------------------------------------------------------------------------


def test_route_beats_service_beats_namespace_beats_mesh(router: Router) -> None:
    admin = router.policy("reviews.default", "admin")
    assert admin.timeout == 1.0
    assert admin.retries.attempts == 3  # from the service policy
    assert admin.retries.retry_on == frozenset({"5xx"})
    assert admin.circuit_breaker.open_duration == 3.0  # from the namespace policy
    assert admin.circuit_breaker.consecutive_failures == 7  # from the mesh policy
    assert admin.load_balancer.kind.value == "random"  # mesh
    assert admin.rate_limit is None  # default
    assert admin.outlier_detection == EffectivePolicy().outlier_detection  # default


def test_sources_name_the_scope_of_each_field(router: Router) -> None:
    sources = router.policy("reviews.default", "admin").sources
    assert sources["timeout"].startswith("route:") and "reviews-admin" in sources["timeout"]
    assert sources["retries.attempts"].startswith("service:")
    assert "reviews-policy" in sources["retries.attempts"]
    assert sources["circuit_breaker.open_duration"].startswith("namespace:")
    assert "ns-default" in sources["circuit_breaker.open_duration"]
    assert sources["circuit_breaker.consecutive_failures"].startswith("mesh:")
    assert "mesh-wide" in sources["circuit_breaker.consecutive_failures"]
    assert sources.get("rate_limit", "default").startswith("default")


def test_service_policy_without_route(router: Router) -> None:
    policy = router.policy("reviews.default", None)
    assert policy.timeout == 2.0
    assert policy.sources["timeout"].startswith("service:")
    writes = router.policy("reviews.default", "writes")
    assert writes.timeout == 2.0  # the route policy does not set it
    assert writes.retries.retryable and writes.retries.attempts == 3
    assert not policy.retries.retryable


def test_namespace_and_mesh_scopes(router: Router) -> None:
    details = router.policy("details.default", None)
    assert details.timeout == 5.0 and details.retries.attempts == 1
    ratings = router.policy("ratings.shop", None)  # another namespace: only the mesh policy
    assert ratings.timeout == 10.0
    assert ratings.circuit_breaker.open_duration == EffectivePolicy().circuit_breaker.open_duration
    assert ratings.sources["timeout"].startswith("mesh:")


def test_policy_is_cached(router: Router) -> None:
    assert router.policy("reviews.default", "admin") is router.policy("reviews.default", "admin")


def test_no_policies_gives_defaults() -> None:
    text = POLICY.split("---\napiVersion: meshlib/v1\nkind: TrafficPolicy")[0]
    bare = Router(load_text(text))
    policy = bare.policy("reviews.default", None)
    assert policy == EffectivePolicy()
    assert dict(policy.sources) == {}


class _CountedTarget(PolicyTarget):
    """A policy target that counts how often a merge asks for its scope."""

    __slots__ = ()
    asked: ClassVar[Counter[str]] = Counter()

    @property
    def scope(self) -> str:
        scope = PolicyTarget.scope.fget(self)  # type: ignore[attr-defined]
        type(self).asked[f"{self.service or self.namespace or 'mesh'}"] += 1
        return str(scope)


def test_a_merge_reads_only_the_policies_that_may_apply() -> None:
    """The first merge per service after a reload reads what applies to it (the mesh's, its
    namespace's, its own), not every service's policy: services x policies in all, before."""
    snap = load_text(POLICY)
    others = [
        TrafficPolicyDoc(
            f"p{i}", "shop", _CountedTarget(service=f"other-{i}.shop"), {"timeout": 9.0}
        )
        for i in range(50)
    ]
    docs = (
        TrafficPolicyDoc("all", "default", _CountedTarget(), {"timeout": 1.0}),
        *others,
        TrafficPolicyDoc("ns", "default", _CountedTarget(namespace="default"), {"timeout": 2.0}),
        TrafficPolicyDoc(
            "own", "default", _CountedTarget(service="reviews.default"), {"timeout": 3.0}
        ),
        TrafficPolicyDoc("ratings-ns", "shop", _CountedTarget(namespace="shop"), {"timeout": 4.0}),
    )
    _CountedTarget.asked.clear()
    router = Router(dataclasses.replace(snap, traffic_policies=docs))
    reviews = router.policy("reviews.default", None)
    assert (reviews.timeout, reviews.sources["timeout"]) == (3.0, "service:default/own")
    ratings = router.policy("ratings.shop", None)
    assert (ratings.timeout, ratings.sources["timeout"]) == (4.0, "namespace:shop/ratings-ns")
    assert router.policy("details.default", None).timeout == 2.0
    assert not any(key.startswith("other-") for key in _CountedTarget.asked), _CountedTarget.asked


def test_fault_rules_are_read_only_where_they_may_apply() -> None:
    """A service's fault rules, found on first use per (service, route), are read from the
    FaultInjections whose target may apply to it, in snapshot order: every service's, before."""
    snap = load_text(POLICY)

    def fault(name: str, namespace: str, target: PolicyTarget, status: int) -> FaultRule:
        return FaultRule(name, namespace, target, abort=AbortFault(status, 100.0))

    others = [
        fault(f"f{i}", "shop", _CountedTarget(service=f"other-{i}.shop"), 500) for i in range(50)
    ]
    faults = (
        fault("own", "default", _CountedTarget(service="reviews.default"), 503),
        fault("all", "default", _CountedTarget(), 501),
        *others,
        fault("ns", "default", _CountedTarget(namespace="default"), 502),
        fault("route", "default", _CountedTarget(service="reviews.default", route="admin"), 504),
        fault("shop-ns", "shop", _CountedTarget(namespace="shop"), 505),
    )
    _CountedTarget.asked.clear()
    router = Router(dataclasses.replace(snap, faults=faults))
    assert [f.name for f in router.faults("reviews.default", None)] == ["own", "all", "ns"]
    assert [f.name for f in router.faults("reviews.default", "admin")] == [
        "own",
        "all",
        "ns",
        "route",
    ]
    assert [f.name for f in router.faults("ratings.shop", None)] == ["all", "shop-ns"]
    assert [f.name for f in router.faults("details.default", None)] == ["all", "ns"]
    assert not any(key.startswith("other-") for key in _CountedTarget.asked), _CountedTarget.asked
