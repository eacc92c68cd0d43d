"""meshlib/v1 kinds: Mesh, Service, TrafficPolicy, FaultInjection, TrafficMirror (CFG-5)."""

from __future__ import annotations

import pytest
from cfgdocs import N_SERVICES, find, line_of, load, problems_with_services, with_services

from meshlib.config.model import (
    AccessControl,
    Egress,
    LoadBalancerKind,
    MTLSMode,
    PolicyTarget,
    RateLimitPolicy,
)


def policy(spec: str, target: str = "{service: reviews}", name: str = "p") -> str:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return (
        f"apiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {{name: {name}}}\n"
        f"spec:\n  target: {target}\n{body}\n"
    )


def test_mesh_settings() -> None:
    text = """
apiVersion: meshlib/v1
kind: Mesh
metadata: {name: mesh}
spec: {trustDomain: example.org, mtls: strict, accessControl: enforce, egress: registry-only}
"""
    mesh = load(text).mesh
    assert mesh.trust_domain == "example.org"
    assert (mesh.mtls, mesh.access_control, mesh.egress) == (
        MTLSMode.STRICT,
        AccessControl.ENFORCE,
        Egress.REGISTRY_ONLY,
    )


def test_mesh_defaults_and_single_mesh() -> None:
    assert load().mesh.mtls is MTLSMode.DISABLE
    mesh = "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: m%d}\nspec: {mtls: strictt}\n"
    found = problems_with_services(mesh % 1, mesh % 2)
    assert "did you mean 'strict'" in find(found, "spec.mtls").message
    assert find(found, "kind", "only one Mesh")


def test_service_endpoints() -> None:
    text = """
apiVersion: meshlib/v1
kind: Service
metadata: {name: details, namespace: shop}
spec:
  serviceAccount: details
  port: 9080
  endpoints:
  - address: "10.0.0.1:80"
  - {address: "[::1]:8080", weight: 3, labels: {version: v2}}
  - {address: "details.example.com:443"}
"""
    svc = load(text).services["details.shop"]
    assert [e.address for e in svc.endpoints] == [
        "10.0.0.1:80",
        "[::1]:8080",
        "details.example.com:443",
    ]
    assert svc.endpoints[1].weight == 3 and svc.endpoints[1].labels == {"version": "v2"}
    assert svc.endpoints[1].host == "::1" and svc.endpoints[1].port == 8080
    assert (svc.service_account, svc.port) == ("details", 9080)


def test_service_without_spec_or_endpoints() -> None:
    text = "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: lonely}\n"
    assert load(text).services["lonely.default"].endpoints == ()


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("10.0.0.1", "has no port: write host:port, like '10.0.0.1:80'"),
        ("10.0.0.1:0", "1..65535"),
        ("10.0.0.1:70000", "1..65535"),
        ("::1:80", "write IPv6 hosts in brackets, like '[::1]:80'"),
        # a URL where an address goes: each part that does not belong is named
        ("http://127.0.0.1:9080", "drop the scheme: write host:port, like '127.0.0.1:9080'"),
        ("https://reviews/api", "drop the scheme: write host:port, like 'reviews:443'"),
        ("127.0.0.1:9080/api", "has no path ('/api'): write host:port, like '127.0.0.1:9080'"),
        ("localhost", "has no port: write host:port, like 'localhost:80'"),
        ("localhost:", "has no port after ':'"),
        ("reviews:80:90", "has more than one ':'"),
        ("[nothex]:80", "not an IPv6"),
        ("bad_host!:80", "not a valid host"),
    ],
)
def test_bad_addresses(address: str, message: str) -> None:
    text = "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: x}\n"
    text += f'spec:\n  endpoints:\n  - address: "{address}"\n'
    p = find(problems_with_services(text), "spec.endpoints[0].address", message)
    assert p.line == line_of(with_services(text), "- address")


def test_service_name_may_not_contain_dot() -> None:
    text = "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: a.b}\n"
    assert find(problems_with_services(text), "metadata.name", "may not contain '.'")


FULL_POLICY = """
timeout: 2s
retries:
  attempts: 3
  perTryTimeout: 500ms
  retryOn: 5xx, Reset ,503
  retryable: true
  backoff: {baseInterval: 10ms, maxInterval: 1s}
  budget: {ratio: 0.5, minRetriesPerSecond: 5, ttl: 30s}
circuitBreaker: {consecutiveFailures: 3, openDuration: 1m}
outlierDetection:
  consecutiveFailures: 7
  baseEjectionTime: 10s
  maxEjectionTime: 2m
  maxEjectionPercent: 30
  panicThreshold: 40
loadBalancer: {type: round-robin, decay: 5s}
rateLimit: {requestsPerSecond: 2.5}
connectionPool: {maxConnections: 100, maxKeepalive: 10}
hedging: {enabled: true, delay: 50ms, maxAttempts: 3}
"""


def test_traffic_policy_fields_flattened_with_model_names() -> None:
    doc = load(policy(FULL_POLICY)).traffic_policies[0]
    assert doc.target == PolicyTarget(namespace="default", service="reviews.default")
    assert doc.fields == {
        "timeout": 2.0,
        "retries.attempts": 3,
        "retries.per_try_timeout": 0.5,
        "retries.retry_on": frozenset({"5xx", "reset", "503"}),
        "retries.retryable": True,
        "retries.backoff.base": 0.01,
        "retries.backoff.cap": 1.0,
        "retries.budget.ratio": 0.5,
        "retries.budget.min_per_second": 5.0,
        "retries.budget.ttl": 30.0,
        "circuit_breaker.consecutive_failures": 3,
        "circuit_breaker.open_duration": 60.0,
        "outlier_detection.consecutive_failures": 7,
        "outlier_detection.base_ejection_time": 10.0,
        "outlier_detection.max_ejection_time": 120.0,
        "outlier_detection.max_ejection_percent": 30.0,
        "outlier_detection.panic_threshold": 40.0,
        "load_balancer.kind": LoadBalancerKind.ROUND_ROBIN,
        "load_balancer.decay": 5.0,
        "rate_limit": RateLimitPolicy(2.5, 3),
        "connection_pool.max_connections": 100,
        "connection_pool.max_keepalive": 10,
        "hedging.enabled": True,
        "hedging.delay": 0.05,
        "hedging.max_attempts": 3,
    }


def test_policy_targets() -> None:
    routes = """
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: r}
spec: {matches: [{name: get-review, pathRegex: /reviews}]}
"""
    snap = load(
        routes,
        policy("timeout: 1s", "{service: reviews, route: get-review}", "a"),
        policy("timeout: 1s", "{namespace: shop}", "b"),
        policy("timeout: 1s", "{}", "c").replace("  target: {}\n", ""),
        policy("timeout: 1s", "{service: reviews.default}", "d"),
    )
    targets = [p.target for p in snap.traffic_policies]
    assert [t.scope for t in targets] == ["route", "namespace", "mesh", "service"]
    assert targets[0].route == "get-review" and targets[0].service == "reviews.default"
    assert targets[1].namespace == "shop"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1s", "negative"),
        ("0", "at least 1ms"),
        ("0s", "at least 1ms"),
        ("0.5ms", "1ms precision"),
        ("240h", "at most 24h"),
        ("10", "unit"),
        ("1.5us", "unit"),
    ],
)
def test_timeout_bounds(value: str, message: str) -> None:
    text = policy(f'timeout: "{value}"')
    p = find(problems_with_services(text), "spec.timeout", message)
    assert p.line == line_of(with_services(text), "timeout:")
    assert p.document == N_SERVICES + 1


def test_bare_number_duration_is_a_type_error() -> None:
    p = find(problems_with_services(policy("timeout: 2")), "spec.timeout")
    assert "duration string" in p.message


def test_per_try_not_shorter_than_timeout() -> None:
    text = policy("timeout: 1s\nretries: {perTryTimeout: 2s}")
    assert find(problems_with_services(text), "spec.retries.perTryTimeout", "shorter than timeout")
    text = policy("timeout: 1s\nretries: {perTryTimeout: 1s}")
    assert find(problems_with_services(text), "spec.retries.perTryTimeout")


def test_attempts_clamped_with_warning() -> None:
    text = policy("retries: {attempts: 50}")
    snap = load(text)
    assert snap.traffic_policies[0].fields["retries.attempts"] == 4
    [w] = snap.warnings
    assert w.field == "spec.retries.attempts" and "clamped" in w.message
    assert w.line == line_of(with_services(text), "attempts: 50")


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ("retries: {attempts: -1}", "spec.retries.attempts", "at least 0"),
        ("retries: {budget: {ratio: -1}}", "spec.retries.budget.ratio", "at least 0"),
        ("retries: {budget: {ratio: 10000}}", "spec.retries.budget.ratio", "at most 10"),
        ("retries: {budget: {ttl: 1000s}}", "spec.retries.budget.ttl", "at most 1m"),
        ("retries: {budget: {ttl: 100ms}}", "spec.retries.budget.ttl", "at least 1s"),
        (
            "retries: {budget: {minRetriesPerSecond: 20000}}",
            "spec.retries.budget.minRetriesPerSecond",
            "at most",
        ),
        ("retries: {retryOn: [5xx, bogus]}", "spec.retries.retryOn", "'bogus'"),
        ("retries: {retryOn: '700'}", "spec.retries.retryOn", "'700'"),
        (
            "retries: {backoff: {baseInterval: 2s, maxInterval: 1s}}",
            "spec.retries.backoff.baseInterval",
            "exceed",
        ),
        (
            "circuitBreaker: {consecutiveFailures: 0}",
            "spec.circuitBreaker.consecutiveFailures",
            "at least 1",
        ),
        (
            "outlierDetection: {maxEjectionPercent: 101}",
            "spec.outlierDetection.maxEjectionPercent",
            "at most 100",
        ),
        ("loadBalancer: {type: least-request}", "spec.loadBalancer.type", "not one of"),
        ("rateLimit: {requestsPerSecond: 0}", "spec.rateLimit.requestsPerSecond", "greater than 0"),
        ("rateLimit: {burst: 5}", "spec.rateLimit.requestsPerSecond", "missing required"),
        ("hedging: {maxAttempts: 9}", "spec.hedging.maxAttempts", "at most 5"),
        ("hedging: {delay: p99}", "spec.hedging.delay", "'p95'"),
        ("retries: {retryable: yes please}", "spec.retries.retryable", "boolean"),
        ("timeout: .nan", "spec.timeout", "duration"),
    ],
)
def test_policy_bounds(spec: str, field: str, message: str) -> None:
    assert find(problems_with_services(policy(spec)), field, message)


def test_rate_limit_burst_and_hedging_p95() -> None:
    fields = (
        load(policy("rateLimit: {requestsPerSecond: 100, burst: 20}\nhedging: {delay: p95}"))
        .traffic_policies[0]
        .fields
    )
    assert fields["rate_limit"] == RateLimitPolicy(100.0, 20)
    assert fields["hedging.delay"] is None


def test_conflicting_policies_for_one_target_name_both_documents() -> None:
    found = problems_with_services(
        policy("timeout: 1s\nretries: {attempts: 2}", name="first"),
        policy("retries: {attempts: 3}", "{service: reviews.default}", name="second"),
        policy("retries: {attempts: 1}", "{namespace: default}", name="ns-level"),
    )
    [p] = [p for p in found if p.field == "spec.retries.attempts"]
    assert p.document == N_SERVICES + 2
    assert "'first'" in p.message and f"document {N_SERVICES + 1}" in p.message


def test_policy_target_must_exist() -> None:
    found = problems_with_services(
        policy("timeout: 1s", "{service: nope}", "a"),
        policy("timeout: 1s", "{service: reviews, route: nope}", "b"),
        policy("timeout: 1s", "{route: x}", "c"),
    )
    assert "not declared" in find(found, "spec.target.service").message
    assert "no HTTPRouteGroup" in find(found, "spec.target.route", "match named").message
    assert find(found, "spec.target.route", "needs a service")


FAULT = """
apiVersion: meshlib/v1
kind: FaultInjection
metadata: {name: f}
spec:
  target: {service: ratings}
  match: {headers: {End-User: jason}}
  delay: {fixed: 7s}
  abort: {status: 503, percent: 50}
"""


def test_fault_injection() -> None:
    fault = load(FAULT).faults[0]
    assert fault.target.service == "ratings.default"
    assert fault.delay is not None and (fault.delay.fixed, fault.delay.percent) == (7.0, 100.0)
    assert fault.abort is not None and (fault.abort.status, fault.abort.percent) == (503, 50.0)
    assert fault.headers == {"end-user": "jason"}


@pytest.mark.parametrize(
    ("old", "new", "field", "message"),
    [
        (
            "  delay: {fixed: 7s}\n  abort: {status: 503, percent: 50}\n",
            "",
            "spec",
            "needs a delay",
        ),
        ("status: 503", "status: 600", "spec.abort.status", "at most 599"),
        ("percent: 50", "percent: 150", "spec.abort.percent", "at most 100"),
        ("fixed: 7s", "fixed: 0ms", "spec.delay.fixed", "at least 1ms"),
        ("target: {service: ratings}", "target: {namespace: x}", "spec.target.service", "required"),
        ("{fixed: 7s}", "{percent: 5}", "spec.delay.fixed", "missing required"),
    ],
)
def test_fault_problems(old: str, new: str, field: str, message: str) -> None:
    assert find(problems_with_services(FAULT.replace(old, new)), field, message)


MIRROR = """
apiVersion: meshlib/v1
kind: TrafficMirror
metadata: {name: m}
spec: {service: reviews, mirror: reviews-v2, percent: 25}
"""


def test_traffic_mirror() -> None:
    m = load(MIRROR).mirrors[0]
    assert (m.service, m.mirror, m.percent) == ("reviews.default", "reviews-v2.default", 25.0)
    assert load(MIRROR.replace(", percent: 25", "")).mirrors[0].percent == 100.0


def test_mirror_problems() -> None:
    assert find(
        problems_with_services(MIRROR.replace("reviews-v2", "reviews")), "spec.mirror", "itself"
    )
    assert find(
        problems_with_services(MIRROR.replace("reviews-v2", "ghost")), "spec.mirror", "not declared"
    )


def test_request_authentication_kept_raw() -> None:
    text = """
apiVersion: meshlib/v1
kind: RequestAuthentication
metadata: {name: jwt}
spec: {jwtRules: [{issuer: "https://issuer.example", jwksUri: "https://issuer.example/jwks"}]}
"""
    snap = load(text)
    raw = [d for d in snap.raw_documents if d["kind"] == "RequestAuthentication"]
    assert raw[0]["spec"]["jwtRules"][0]["issuer"] == "https://issuer.example"
    bad = text.replace(text.split("spec: ", 1)[1].strip(), "[1]")
    assert find(problems_with_services(bad), "spec", "mapping")
