"""LOAD-1 and header-matched splits over real sockets: SMI TrafficSplit weights (v1alpha4
integers and v1alpha1 quantities) give binomial shares, weight 0 gets nothing, and a split
with ``matches`` only takes matching requests (the rest go to the root service)."""

from __future__ import annotations

import math

import pytest

from e2e.conftest import service_yaml

pytestmark = pytest.mark.timeout(60)

#: Calls per split configuration: 5σ at p=0.25 is ±8.8 points; the RNG is seeded anyway.
CALLS = 600


def within_5_sigma(count: int, n: int, p: float) -> bool:
    sigma = math.sqrt(n * p * (1.0 - p))
    return abs(count - n * p) <= 5.0 * sigma + 1e-9


def split_yaml(api: str, weights: list[str], matches: str = "") -> str:
    backends = ", ".join(
        f"{{service: reviews-v{i + 1}, weight: {w}}}" for i, w in enumerate(weights)
    )
    return (
        f"apiVersion: {api}\nkind: TrafficSplit\nmetadata: {{name: reviews-split}}\n"
        f"spec:\n  service: reviews\n  backends: [{backends}]\n{matches}"
    )


ROOT_WITHOUT_ENDPOINTS = (
    "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\nspec: {endpoints: []}\n"
)

V4 = "split.smi-spec.io/v1alpha4"
V1 = "split.smi-spec.io/v1alpha1"


@pytest.mark.parametrize(
    ("api", "weights", "expected"),
    [
        pytest.param(V4, ["50", "25", "25"], [0.5, 0.25, 0.25], id="v1alpha4-50/25/25"),
        pytest.param(V4, ["80", "10", "10"], [0.8, 0.1, 0.1], id="v1alpha4-80/10/10"),
        pytest.param(V4, ["1000", "500", "0"], [2 / 3, 1 / 3, 0.0], id="v1alpha4-1000/500/0"),
        pytest.param(V1, ["500m", "250m", "250m"], [0.5, 0.25, 0.25], id="v1alpha1-500m/250m"),
        pytest.param(V1, ["800m", "100m", "100m"], [0.8, 0.1, 0.1], id="v1alpha1-800m/100m"),
        pytest.param(V1, ["1", "500m", "0"], [2 / 3, 1 / 3, 0.0], id="v1alpha1-1/500m/0"),
    ],
)
def test_weighted_split_shares(caller, make_mesh, echo_factory, api, weights, expected) -> None:
    """LOAD-1: each backend's share is within 5σ of its weight; weight 0 receives nothing."""
    backends = [echo_factory(f"v{i + 1}") for i in range(3)]
    docs = [service_yaml(f"reviews-v{i + 1}", [b.port]) for i, b in enumerate(backends)]
    docs += [ROOT_WITHOUT_ENDPOINTS, split_yaml(api, weights)]
    mesh = make_mesh("---\n".join(docs))
    c = caller.bind(mesh)

    results = c.many(CALLS, "GET", "http://reviews/reviews/1", concurrency=4)

    assert all(not isinstance(r, Exception) and r.status_code == 200 for r in results)
    decisions = [r.extensions["mesh_decision"] for r in results if not isinstance(r, Exception)]
    assert {d.split for d in decisions} == {"reviews-split"}
    by_decision = {f"reviews-v{i + 1}.default": 0 for i in range(3)}
    for d in decisions:
        by_decision[d.backend] += 1
    counts = [b.requests for b in backends]
    assert sum(counts) == CALLS
    assert counts == list(by_decision.values())  # the decision names the backend really hit
    for name, count, p in zip(("v1", "v2", "v3"), counts, expected, strict=True):
        if p == 0.0:
            assert count == 0, f"{name} has weight 0 but got {count} calls"
        else:
            assert count > 0, f"{name} has a positive weight but got no traffic"
            assert within_5_sigma(count, CALLS, p), (name, count, CALLS * p, counts)


AB_TEST = """\
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: ab-test}
spec:
  matches:
  - name: firefox-users
    headers: {user-agent: ".*Firefox.*"}
    pathRegex: "/reviews.*"
    methods: ["GET"]
"""

MATCHES = "  matches: [{kind: HTTPRouteGroup, name: ab-test}]\n"

FIREFOX = {"user-agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"}
CHROME = {"user-agent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0"}


def test_header_matched_split_sends_firefox_to_v2_and_the_rest_to_root(
    caller, make_mesh, echo_factory
) -> None:
    """A/B test: a split with ``matches`` takes only matching requests; others go to the root."""
    root, v2 = echo_factory("root"), echo_factory("v2")
    text = "---\n".join(
        [
            service_yaml("reviews", [root.port]),
            service_yaml("reviews-v2", [v2.port]),
            AB_TEST,
            split_yaml(V4, ["100"], MATCHES).replace("reviews-v1", "reviews-v2"),
        ]
    )
    mesh = make_mesh(text)
    c = caller.bind(mesh)

    r = c.get("http://reviews/reviews/1", headers=FIREFOX)
    assert r.json()["backend"] == "v2"
    decision = r.extensions["mesh_decision"]
    assert (decision.route, decision.split, decision.backend) == (
        "firefox-users",
        "reviews-split",
        "reviews-v2.default",
    )
    assert r.json()["headers"]["host"] == "reviews"  # Host kept: v2 serves as "reviews"

    not_matching = [
        ("GET", "/reviews/1", CHROME),  # header does not match
        ("GET", "/reviews/1", {}),  # no user-agent of ours (httpx's own one)
        ("POST", "/reviews/1", FIREFOX),  # method does not match
        ("GET", "/ratings/1", FIREFOX),  # path does not match
    ]
    for method, path, headers in not_matching:
        r = c.request(method, f"http://reviews{path}", headers=headers)
        assert r.json()["backend"] == "root", (method, path, headers)
        d = r.extensions["mesh_decision"]
        assert (d.split, d.backend) == (None, "reviews.default")
    for _ in range(10):
        assert c.get("http://reviews/reviews/2", headers=FIREFOX).json()["backend"] == "v2"
    assert (v2.requests, root.requests) == (11, len(not_matching))


def test_split_with_matches_weighs_only_matching_requests(caller, make_mesh, echo_factory) -> None:
    """Matching requests follow the 50/50 weights; non-matching ones all reach the root."""
    root, v1, v2 = echo_factory("root"), echo_factory("v1"), echo_factory("v2")
    text = "---\n".join(
        [
            service_yaml("reviews", [root.port]),
            service_yaml("reviews-v1", [v1.port]),
            service_yaml("reviews-v2", [v2.port]),
            AB_TEST,
            split_yaml(V4, ["50", "50"], MATCHES),
        ]
    )
    mesh = make_mesh(text)
    c = caller.bind(mesh)

    n = 200
    matching = c.many(n, "GET", "http://reviews/reviews/1", headers=FIREFOX, concurrency=4)
    assert all(not isinstance(r, Exception) and r.status_code == 200 for r in matching)
    assert root.requests == 0
    assert v1.requests + v2.requests == n
    assert within_5_sigma(v1.requests, n, 0.5), (v1.requests, v2.requests)
    assert v1.requests > 0 and v2.requests > 0

    others = c.many(50, "GET", "http://reviews/reviews/1", headers=CHROME, concurrency=4)
    assert all(not isinstance(r, Exception) and r.json()["backend"] == "root" for r in others)
    assert (root.requests, v1.requests + v2.requests) == (50, n)
