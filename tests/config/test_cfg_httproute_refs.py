"""HTTPRoutes in the policy loader (issue 14): references to Services, the TrafficSplit
conflict, route labels as TrafficPolicy/FaultInjection targets, creationTimestamp, and a bad
update on hot reload keeping the last good snapshot. Each problem names file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from cfgdocs import N_SERVICES, find, line_of, load, problems_with_services, with_services
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.config.loader import INTERNAL_ERROR


def http_route(
    parents: str = '[{group: "", kind: Service, name: reviews}]',
    rules: str = "[{name: main, backendRefs: [{name: reviews-v1, port: 9081}]}]",
    *,
    name: str = "reviews-route",
    metadata: str = "",
) -> str:
    return (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        f"metadata:\n  name: {name}\n{metadata}"
        f"spec:\n  parentRefs: {parents}\n  rules: {rules}\n"
    )


def targeted(kind: str, route: str) -> str:
    body = "timeout: 1s" if kind == "TrafficPolicy" else "abort: {status: 503, percent: 50}"
    return (
        f"apiVersion: meshlib/v1\nkind: {kind}\nmetadata: {{name: p}}\n"
        f"spec:\n  target: {{service: reviews, route: {route}}}\n  {body}\n"
    )


def test_a_parent_service_that_is_not_declared_is_an_error_at_its_name() -> None:
    parents = (
        '\n  - {group: "", kind: Service, name: reviews}'
        '\n  - {group: "", kind: Service, name: nowhere, namespace: shop}'
    )
    text = http_route(parents)
    found = problems_with_services(text)
    p = find(found, "spec.parentRefs[1].name", "'nowhere' is not declared in namespace 'shop'")
    assert p.file == "test.yaml"
    assert p.line == line_of(with_services(text), "name: nowhere")
    assert p.document == N_SERVICES + 1
    assert len(found) == 1  # the declared parent is fine


def test_a_backend_service_that_is_not_declared_is_a_warning_and_loads() -> None:
    rules = (
        "\n  - backendRefs:\n    - {name: reviews-v1, port: 9081}\n    - {name: ghost, port: 80}"
    )
    text = http_route(rules=rules)
    snapshot = load(text)
    assert [r.name for r in snapshot.http_routes] == ["reviews-route"]
    warning = find(list(snapshot.warnings), "spec.rules[0].backendRefs[1]", "ghost")
    assert warning.file == "test.yaml"
    assert warning.line == line_of(with_services(text), "name: ghost")


def test_a_mirror_to_an_undeclared_service_is_a_warning_that_says_nothing_is_mirrored() -> None:
    rules = (
        "\n  - filters:\n    - type: RequestMirror\n"
        "      requestMirror: {backendRef: {name: ghost, port: 80}}\n"
        "    backendRefs: [{name: reviews-v1, port: 9081}]"
    )
    snapshot = load(http_route(rules=rules))
    warning = find(
        list(snapshot.warnings), "spec.rules[0].filters[0].requestMirror.backendRef", "ghost"
    )
    assert "nothing is mirrored to it" in warning.message
    assert "500" not in warning.message  # a mirror's failure never answers the call


def test_a_gateway_parent_is_not_checked_against_services() -> None:
    snapshot = load(http_route("[{name: edge}]"))
    assert snapshot.http_routes[0].parent_refs[0].kind == "Gateway"


def test_a_route_on_a_traffic_split_root_is_an_error() -> None:
    split = (
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: canary}\n"
        "spec:\n  service: reviews\n  backends:\n  - {service: reviews-v1, weight: 1}\n"
    )
    text = http_route()
    p = find(problems_with_services(split, text), "spec.parentRefs[0].name", "TrafficSplit")
    assert p.line == line_of(with_services(split, text), "parentRefs")
    assert "canary" in p.message or "TrafficSplit" in p.message


def test_a_route_without_rules_loads_with_the_default_rule() -> None:
    text = (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: bare}\n"
        'spec:\n  parentRefs: [{group: "", kind: Service, name: reviews}]\n'
    )
    snapshot = load(text)
    (route,) = snapshot.http_routes
    assert len(route.rules) == 1 and route.rules[0].backend_refs == ()


@pytest.mark.parametrize("kind", ["TrafficPolicy", "FaultInjection"])
def test_a_target_route_may_name_a_rule_or_the_route_of_an_unnamed_rule(kind: str) -> None:
    rules = (
        "\n  - name: main\n    backendRefs: [{name: reviews-v1, port: 9081}]"
        "\n  - matches: [{path: {value: /other}}]"
        "\n    backendRefs: [{name: reviews-v2, port: 9082}]"
    )
    route = http_route(rules=rules)
    assert load(route, targeted(kind, "main"))  # a rule's name
    assert load(route, targeted(kind, "reviews-route"))  # the unnamed rule's label


@pytest.mark.parametrize("kind", ["TrafficPolicy", "FaultInjection"])
@pytest.mark.parametrize("label", ["mian", "reviews-route"])
def test_a_target_route_naming_no_rule_is_an_error(kind: str, label: str) -> None:
    # The only rule is named "main": the route's name is not a label of any of its rules.
    target = targeted(kind, label)
    p = find(problems_with_services(http_route(), target), "spec.target.route", label)
    assert p.line == line_of(with_services(http_route(), target), f"route: {label}")


def test_creation_timestamp_is_accepted_and_read() -> None:
    metadata = "  creationTimestamp: '2024-05-01T10:00:00Z'\n  uid: abc\n  generation: 2\n"
    snapshot = load(http_route(metadata=metadata))
    assert snapshot.http_routes[0].created == "2024-05-01T10:00:00Z"


def test_a_creation_timestamp_not_in_utc_seconds_is_an_error() -> None:
    metadata = "  creationTimestamp: '2024-05-01T10:00:00+02:00'\n"
    text = http_route(metadata=metadata)
    p = find(problems_with_services(text), "metadata.creationTimestamp")
    assert p.line == line_of(with_services(text), "creationTimestamp")


def test_a_bad_route_update_keeps_the_last_good_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    good = with_services(http_route())
    path.write_text(good)
    registry = CollectorRegistry()
    with meshlib.Mesh.from_file(path, service="t", watch=False, registry=registry) as mesh:
        before = mesh.snapshot
        assert [r.name for r in before.http_routes] == ["reviews-route"]
        bad = good.replace("name: reviews}]", "name: nowhere}]")
        assert bad != good
        path.write_text(bad)
        assert mesh.reload() is False
        assert mesh.snapshot is before
        error = mesh.last_error
        assert error is not None
        assert [(p.file, p.field) for p in error.problems] == [
            (str(path), "spec.parentRefs[0].name")
        ]
        assert all(INTERNAL_ERROR not in p.message for p in error.problems)
        rejected = registry.get_sample_value("mesh_config_reloads_total", {"result": "rejected"})
        assert rejected == 1

        fixed = good.replace("name: main", "name: primary")
        path.write_text(fixed)
        assert mesh.reload() is True
        assert mesh.snapshot is not before
        assert mesh.snapshot.http_routes[0].rules[0].name == "primary"
