"""SMI TrafficTarget enforcement and the mesh-wide accessControl modes (pure, no sockets)."""

from __future__ import annotations

import pytest

from meshlib.identity.spiffe import SpiffeID
from meshlib.policy.authz import AuthzIndex, authorize, index_for
from meshlib.policy.routing import Router
from policy.authz.authzdocs import ROUTES, SERVICES, TARGET_V1, decide, load, mesh, sa, target_spec

RATINGS = sa("ratings")
DETAILS = sa("details")

#: (case id, target documents, caller, method, path, headers, allowed, rule fragment)
CASES = [
    ("v1-listed-source-read", [TARGET_V1], RATINGS, "GET", "/reviews/1", {}, True, "rule 0"),
    ("v1-listed-source-head", [TARGET_V1], RATINGS, "HEAD", "/reviews", {}, True, "rule 0"),
    ("v1-method-not-in-match", [TARGET_V1], RATINGS, "POST", "/reviews", {}, False, "no rule"),
    ("v1-path-not-in-match", [TARGET_V1], RATINGS, "GET", "/admin", {}, False, "no rule"),
    ("v1-other-source", [TARGET_V1], DETAILS, "GET", "/reviews/1", {}, False, "no rule"),
    ("v1-unauthenticated", [TARGET_V1], None, "GET", "/reviews/1", {}, False, "no rule"),
    ("v2-listed", [target_spec(2)], RATINGS, "GET", "/reviews/1", {}, True, "t2 rule 0"),
    ("v3-listed", [target_spec(3)], RATINGS, "GET", "/reviews/1", {}, True, "t3 rule 0"),
    ("v3-other", [target_spec(3)], DETAILS, "GET", "/reviews/1", {}, False, "no rule"),
    (
        "v3-all-matches-of-group",
        [target_spec(3, matches="[]")],
        RATINGS,
        "POST",
        "/reviews",
        {},
        True,
        "t3 rule 0",
    ),
    (
        "v3-header-match-needs-header",
        [target_spec(3, matches="[beta]")],
        RATINGS,
        "GET",
        "/beta/x",
        {},
        False,
        "no rule",
    ),
    (
        "v3-header-match-with-header",
        [target_spec(3, matches="[beta]")],
        RATINGS,
        "GET",
        "/beta/x",
        {"x-beta": "yes"},
        True,
        "t3 rule 0",
    ),
    (
        "source-in-other-namespace",
        [target_spec(3, sources="pay/billing")],
        sa("billing", "pay"),
        "GET",
        "/reviews",
        {},
        True,
        "t3",
    ),
    (
        "same-account-wrong-namespace",
        [target_spec(3, sources="pay/billing")],
        sa("billing", "default"),
        "GET",
        "/reviews",
        {},
        False,
        "no rule",
    ),
    (
        "same-account-foreign-trust-domain",
        [TARGET_V1],
        sa("ratings", td="evil.test"),
        "GET",
        "/reviews/1",
        {},
        False,
        "no rule",
    ),
    (
        "not-a-workload-id",
        [TARGET_V1],
        SpiffeID("shop.test", "/ns/default/sa/ratings/extra"),
        "GET",
        "/reviews/1",
        {},
        False,
        "no rule",
    ),
    (
        "two-targets-union",
        [TARGET_V1, target_spec(3, sources="details", matches="[writes]")],
        DETAILS,
        "POST",
        "/reviews",
        {},
        True,
        "t3 rule 0",
    ),
    (
        "path-normalised-before-route-match",
        [TARGET_V1],
        RATINGS,
        "GET",
        "/admin/../reviews/1",
        {},
        True,
        "rule 0",
    ),
]


@pytest.mark.parametrize(
    ("targets", "caller", "method", "path", "headers", "allowed", "rule"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_traffic_target_table(
    targets: list[str],
    caller: SpiffeID | None,
    method: str,
    path: str,
    headers: dict[str, str],
    allowed: bool,
    rule: str,
) -> None:
    snapshot = load(mesh(), SERVICES, ROUTES, *targets)
    verdict = decide(snapshot, caller, method, path, headers=headers)
    assert verdict.allowed is allowed and verdict.denied_by_policy is (not allowed)
    assert rule in verdict.rule
    assert verdict.mode == "open"


def test_destination_not_named_is_open_by_default() -> None:
    """SEC-13: without accessControl enforce, only destinations a TrafficTarget names deny."""
    snapshot = load(mesh(), SERVICES, ROUTES, TARGET_V1)
    verdict = decide(snapshot, None, "DELETE", "/anything", service="details.default")
    assert verdict.allowed and not verdict.denied_by_policy
    assert verdict.rule.startswith("default: open")


def test_unknown_identity_never_widens_access() -> None:
    """SEC-13: a rule naming a nonexistent identity opens nothing."""
    # A TrafficTarget whose only source is an account no Service uses: loaded with a warning,
    # and it admits nobody else — the destination is now deny-by-default.
    snapshot = load(mesh(), SERVICES, ROUTES, target_spec(3, sources="ghost"))
    assert any("ghost" in w.message for w in snapshot.warnings)
    for caller in (RATINGS, DETAILS, None, sa("reviews-sa")):
        assert not decide(snapshot, caller).allowed
    assert decide(snapshot, sa("ghost")).allowed  # exactly what it names, nothing more


def test_destination_account_defaults_to_service_name() -> None:
    text = target_spec(3).replace("name: reviews-sa", "name: details")
    snapshot = load(mesh(), SERVICES, ROUTES, text)
    assert decide(snapshot, RATINGS, service="details.default").allowed
    assert not decide(snapshot, DETAILS, service="details.default").allowed
    # reviews uses the account reviews-sa, which no target names: still open
    assert decide(snapshot, DETAILS).allowed


def test_enforce_denies_unnamed_destinations() -> None:
    """SEC-13: authorization enforced with no rule for a destination: everything denied."""
    snapshot = load(mesh("enforce"), SERVICES, ROUTES, TARGET_V1)
    verdict = decide(snapshot, RATINGS, service="details.default")
    assert not verdict.allowed and verdict.denied_by_policy and verdict.mode == "enforce"
    assert verdict.rule == "default: deny (accessControl: enforce)"
    assert decide(snapshot, RATINGS).allowed  # what a target allows is still allowed
    assert not decide(snapshot, DETAILS).allowed


def test_audit_allows_but_records_would_deny() -> None:
    """SEC-13: audit mode allows but records the would-be denial."""
    snapshot = load(mesh("audit"), SERVICES, ROUTES, TARGET_V1)
    named = decide(snapshot, DETAILS)
    assert named.allowed and named.denied_by_policy and named.verdict == "deny"
    assert named.mode == "audit" and "no rule" in named.rule
    unnamed = decide(snapshot, DETAILS, service="details.default")
    assert unnamed.allowed and unnamed.denied_by_policy
    good = decide(snapshot, RATINGS)
    assert good.allowed and not good.denied_by_policy and good.verdict == "allow"


def test_tcp_route_rule_admits_every_request_from_listed_source() -> None:
    tcp = "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: db}\n"
    target = target_spec(3).replace(
        "kind: HTTPRouteGroup\n    name: api\n    matches: [reads]", "kind: TCPRoute\n    name: db"
    )
    snapshot = load(mesh(), SERVICES, ROUTES, tcp, target)
    assert decide(snapshot, RATINGS, "DELETE", "/x").allowed
    assert not decide(snapshot, DETAILS, "GET", "/x").allowed


def test_udp_route_rule_admits_no_http_request() -> None:
    """meshlib carries HTTP only: a rule for UDP traffic grants no request, and the target still
    makes its destination deny-by-default."""
    udp = (
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: UDPRoute\nmetadata: {name: dns}\n"
        "spec: {matches: {ports: [53]}}\n"
    )
    target = target_spec(3).replace(
        "kind: HTTPRouteGroup\n    name: api\n    matches: [reads]", "kind: UDPRoute\n    name: dns"
    )
    snapshot = load(mesh(), SERVICES, ROUTES, udp, target)
    assert [r.kind for r in snapshot.traffic_targets[0].rules] == ["UDPRoute"]
    assert not decide(snapshot, RATINGS, "GET", "/x").allowed
    assert not decide(snapshot, DETAILS, "GET", "/x").allowed


def test_index_is_built_once_per_snapshot() -> None:
    snapshot = load(mesh(), SERVICES, ROUTES, TARGET_V1)
    router = Router(snapshot)
    service = snapshot.services["reviews.default"]
    first = index_for(router, service)
    assert index_for(router, service) is first
    assert isinstance(first, AuthzIndex) and first.in_force
    assert authorize(first, service, RATINGS, "GET", "/reviews", None).allowed
    assert not index_for(Router(snapshot), snapshot.services["details.default"]).in_force
