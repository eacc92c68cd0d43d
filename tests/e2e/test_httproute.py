"""HTTPRoute behaviour over real sockets that the conformance cases do not reach (issue 14): the
500 share of an undeclared backend, a backend without endpoints, the rule's timeouts, policies
and faults targeted at a rule, the metrics' route label, RequestMirror, ResponseHeaderModifier
and the decision record. Every test runs through the sync and the async client."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from harness import EchoBackend
from policy.fakes import binomial_bounds
from prometheus_client import CollectorRegistry

import meshlib
from e2e.conftest import CallerFactory, service_yaml

pytestmark = pytest.mark.timeout(30)

MakeMesh = Callable[..., meshlib.Mesh]
EchoFactory = Callable[..., EchoBackend]


def http_route(rules: str, *, name: str = "web-route") -> str:
    """An HTTPRoute on the ``web`` service; ``rules`` is the YAML list under spec.rules."""
    return (
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        f"metadata: {{name: {name}, namespace: default}}\n"
        'spec:\n  parentRefs: [{group: "", kind: Service, name: web}]\n'
        f"  rules:\n{rules}"
    )


def document(kind: str, name: str, spec: str) -> str:
    return f"---\napiVersion: meshlib/v1\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n"


def policy_text(*backends: EchoBackend, routes: str, extra: str = "") -> str:
    """Services ``web`` (the routed one) and one per backend, named as the backend."""
    web = service_yaml("web", [backends[0].port])
    own = "".join("---\n" + service_yaml(b.name, [b.port]) for b in backends)
    return web + own + routes + extra


def test_an_undeclared_backend_gets_its_share_of_500s(
    caller: CallerFactory, make_mesh: MakeMesh, echo_factory: EchoFactory
) -> None:
    v1 = echo_factory("v1")
    routes = http_route(
        "  - name: half\n    backendRefs:\n"
        "    - {name: v1, port: 80, weight: 1}\n    - {name: ghost, port: 80, weight: 1}\n"
    )
    mesh = make_mesh(policy_text(v1, routes=routes), seed=14)
    c = caller.bind(mesh)
    n = 200
    statuses = []
    for _ in range(n):
        response = c.get("http://web/x")
        statuses.append(response.status_code)
        if response.status_code == 500:
            assert response.headers["x-mesh-reason"] == "invalid_backend"
            decision = response.extensions["mesh_decision"]
            assert (decision.route, decision.reason) == ("half", "invalid_backend")
    low, high = binomial_bounds(n, 0.5)
    assert low <= statuses.count(500) <= high, statuses.count(500)
    assert statuses.count(200) == n - statuses.count(500) == v1.requests


def test_a_backend_without_endpoints_is_no_healthy_endpoints(
    caller: CallerFactory, make_mesh: MakeMesh, echo_factory: EchoFactory
) -> None:
    v1 = echo_factory("v1")
    empty = "---\n" + service_yaml("empty", []).replace("endpoints:\n", "endpoints: []\n")
    routes = http_route("  - name: nowhere\n    backendRefs: [{name: empty, port: 80}]\n")
    mesh = make_mesh(policy_text(v1, routes=empty + routes))
    result = caller.bind(mesh).outcome("GET", "http://web/x")
    assert isinstance(result, meshlib.NoHealthyEndpointsError), result
    assert result.decision is not None
    assert (result.decision.route, result.decision.backend) == ("nowhere", "empty.default")

    local = caller.bind(mesh, local_responses=True).get("http://web/x")
    assert local.status_code == 503
    assert local.headers["x-mesh-reason"] == "no_healthy_endpoints"
    assert v1.requests == 0


def test_the_request_timeout_is_the_calls_deadline(
    caller: CallerFactory, make_mesh: MakeMesh, echo_factory: EchoFactory
) -> None:
    v1 = echo_factory("v1")
    v1.set_delay(2.0, path="/slow")
    routes = http_route(
        "  - name: bounded\n    timeouts: {request: 300ms}\n"
        "    backendRefs: [{name: v1, port: 80}]\n"
    )
    mesh = make_mesh(policy_text(v1, routes=routes))
    result = caller.bind(mesh).outcome("GET", "http://web/slow")
    assert isinstance(result, meshlib.MeshTimeout), result
    decision = result.decision
    assert decision is not None and decision.status == 504
    assert decision.deadline == pytest.approx(0.3)
    assert decision.route == "bounded"


def test_the_backend_request_timeout_is_per_try_and_a_retry_follows(
    caller: CallerFactory, make_mesh: MakeMesh, echo_factory: EchoFactory
) -> None:
    v1 = echo_factory("v1")
    v1.set_delay(2.0, times=1)  # the first try hangs past its 200ms, the retry answers
    routes = http_route(
        "  - name: tries\n    timeouts: {request: 5s, backendRequest: 200ms}\n"
        "    backendRefs: [{name: v1, port: 80}]\n"
    )
    retries = document(
        "TrafficPolicy",
        "web-retries",
        "{target: {service: web}, retries: {attempts: 2, retryOn: [timeout]}}",
    )
    mesh = make_mesh(policy_text(v1, routes=routes, extra=retries))
    response = caller.bind(mesh).get("http://web/x")
    assert response.status_code == 200
    decision = response.extensions["mesh_decision"]
    assert [a.outcome for a in decision.attempts][:1] == ["timeout"]
    assert len(decision.attempts) == 2
    assert decision.deadline == pytest.approx(5.0)


def test_zero_timeouts_disable_the_policys(
    caller: CallerFactory, make_mesh: MakeMesh, echo_factory: EchoFactory
) -> None:
    v1 = echo_factory("v1")
    v1.set_delay(0.5)
    routes = http_route(
        "  - name: unbounded\n    timeouts: {request: 0s, backendRequest: 0s}\n"
        "    backendRefs: [{name: v1, port: 80}]\n"
    )
    tight = document(
        "TrafficPolicy",
        "web-tight",
        "{target: {service: web}, timeout: 100ms, retries: {attempts: 1, perTryTimeout: 50ms, "
        "retryOn: [timeout]}}",
    )
    mesh = make_mesh(policy_text(v1, routes=routes, extra=tight))
    response = caller.bind(mesh).get("http://web/x")
    assert response.status_code == 200
    decision = response.extensions["mesh_decision"]
    assert decision.deadline is None
    assert len(decision.attempts) == 1


TWO_RULES = (
    "  - name: flaky\n    matches: [{path: {value: /flaky}}]\n"
    "    backendRefs: [{name: v1, port: 80}]\n"
    "  - matches: [{path: {value: /plain}}]\n"  # unnamed: its label is the route's name
    "    backendRefs: [{name: v1, port: 80}]\n"
)


def test_a_policy_targeted_at_a_rule_applies_to_that_rule_only(
    caller: CallerFactory, make_mesh: MakeMesh, echo_factory: EchoFactory
) -> None:
    v1 = echo_factory("v1")
    retries = document(
        "TrafficPolicy",
        "flaky-retries",
        "{target: {service: web, route: flaky}, retries: {attempts: 2, retryOn: [5xx]}}",
    )
    mesh = make_mesh(policy_text(v1, routes=http_route(TWO_RULES), extra=retries))
    c = caller.bind(mesh)
    v1.set_status(503, times=1, path="/flaky")
    v1.set_status(503, times=1, path="/plain")
    flaky = c.get("http://web/flaky")
    assert flaky.status_code == 200
    assert len(flaky.extensions["mesh_decision"].attempts) == 2
    plain = c.get("http://web/plain")
    assert plain.status_code == 503
    assert plain.extensions["mesh_decision"].route == "web-route"
    assert len(plain.extensions["mesh_decision"].attempts) == 1


def test_a_fault_targeted_at_a_rule_aborts_only_its_calls(
    caller: CallerFactory, make_mesh: MakeMesh, echo_factory: EchoFactory
) -> None:
    v1 = echo_factory("v1")
    fault = document(
        "FaultInjection",
        "flaky-abort",
        "{target: {service: web, route: flaky}, abort: {status: 418, percent: 100}}",
    )
    mesh = make_mesh(policy_text(v1, routes=http_route(TWO_RULES), extra=fault))
    c = caller.bind(mesh)
    for _ in range(5):
        aborted = c.get("http://web/flaky")
        assert aborted.status_code == 418
        assert aborted.extensions["mesh_decision"].faults == ["abort:418"]
        assert c.get("http://web/plain").status_code == 200
    assert v1.requests == 5
    assert set(v1.by_path) == {"/plain"}


def test_the_metrics_route_label_is_the_rule_label(
    caller: CallerFactory, make_mesh: MakeMesh, echo_factory: EchoFactory
) -> None:
    v1 = echo_factory("v1")
    registry = CollectorRegistry()
    mesh = make_mesh(policy_text(v1, routes=http_route(TWO_RULES)), registry=registry)
    c = caller.bind(mesh)
    for path in ("/flaky", "/flaky", "/plain", "/none"):
        c.get(f"http://web{path}")
    # The destination is the backend the rule chose, as for an SMI split; a call no rule
    # matched never left for a backend: it is counted on the dialled service, without a route.
    labels = {
        "direction": "outbound",
        "source": "tester.default",
        "destination": "v1.default",
        "code": "200",
        "reason": "ok",
    }
    assert registry.get_sample_value("mesh_requests_total", {**labels, "route": "flaky"}) == 2
    assert registry.get_sample_value("mesh_requests_total", {**labels, "route": "web-route"}) == 1
    no_route = {
        **labels,
        "destination": "web.default",
        "route": "",
        "code": "404",
        "reason": "no_route",
    }
    assert registry.get_sample_value("mesh_requests_total", no_route) == 1


def test_request_mirror_copies_to_the_mirror_backend(
    caller: CallerFactory, make_mesh: MakeMesh, echo_factory: EchoFactory
) -> None:
    v1, shadow = echo_factory("v1"), echo_factory("shadow")
    shadow.set_status(500)  # its answer is discarded
    routes = http_route(
        "  - name: mirrored\n    filters:\n    - type: RequestMirror\n"
        "      requestMirror: {backendRef: {name: shadow, port: 80}}\n"
        "    backendRefs: [{name: v1, port: 80}]\n"
    )
    mesh = make_mesh(policy_text(v1, shadow, routes=routes))
    c = caller.bind(mesh)
    response = c.post("http://web/items?x=1", content=b"payload")
    assert response.status_code == 200 and response.json()["backend"] == "v1"
    assert response.extensions["mesh_decision"].mirrored_to == "shadow.default"
    assert shadow.wait_for_requests(1)
    copy = shadow.records[0]
    assert (copy.method, copy.path, copy.query, copy.body_len) == ("POST", "/items", "x=1", 7)
    for _ in range(3):
        c.get("http://web/again")
    assert shadow.wait_for_requests(4)
    assert v1.requests == 4


def test_response_header_modifier_edits_what_the_caller_gets(
    caller: CallerFactory, make_mesh: MakeMesh, echo_factory: EchoFactory
) -> None:
    v1 = echo_factory("v1")
    routes = http_route(
        "  - name: edited\n    filters:\n    - type: ResponseHeaderModifier\n"
        "      responseHeaderModifier:\n"
        "        set: [{name: X-Set, value: rule}]\n"
        "        add: [{name: X-Added, value: one}]\n"
        "        remove: [X-Backend]\n"
        "    backendRefs:\n    - name: v1\n      port: 80\n      filters:\n"
        "      - type: ResponseHeaderModifier\n"
        "        responseHeaderModifier: {add: [{name: X-Added, value: two}]}\n"
    )
    mesh = make_mesh(policy_text(v1, routes=routes))
    response = caller.bind(mesh).get("http://web/x")
    assert response.status_code == 200
    assert response.headers["x-set"] == "rule"
    assert response.headers.get_list("x-added") == ["one", "two"]
    assert "x-backend" not in response.headers
    assert response.json()["backend"] == "v1"  # the body is the backend's


def test_the_decision_shows_the_rule_and_backend_and_the_request_is_edited(
    caller: CallerFactory, make_mesh: MakeMesh, echo_factory: EchoFactory
) -> None:
    v1, v2 = echo_factory("v1"), echo_factory("v2")
    routes = http_route(
        "  - name: to-v2\n    matches: [{path: {value: /old}}]\n    filters:\n"
        "    - type: URLRewrite\n"
        "      urlRewrite: {hostname: v2.example, path: {type: ReplacePrefixMatch,"
        " replacePrefixMatch: /new}}\n"
        "    - type: RequestHeaderModifier\n"
        "      requestHeaderModifier: {set: [{name: X-Env, value: canary}], remove: [x-drop]}\n"
        "    backendRefs: [{name: v2, port: 80}]\n"
        "  - name: rest\n    backendRefs: [{name: v1, port: 80}]\n"
    )
    mesh = make_mesh(policy_text(v1, v2, routes=routes))
    c = caller.bind(mesh)
    response = c.get("http://web/old/x?q=1", headers={"x-env": "prod", "x-drop": "1"})
    assert response.status_code == 200
    decision = response.extensions["mesh_decision"]
    assert (decision.service, decision.route, decision.backend) == (
        "web.default",
        "to-v2",
        "v2.default",
    )
    body = response.json()
    assert (body["backend"], body["path"], body["query"]) == ("v2", "/new/x", "q=1")
    assert body["headers"]["host"] == "v2.example"
    assert body["headers"]["x-env"] == "canary" and "x-drop" not in body["headers"]
    other = c.get("http://web/elsewhere")
    assert other.extensions["mesh_decision"].route == "rest"
    assert other.json()["backend"] == "v1"
