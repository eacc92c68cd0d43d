"""meshlib AuthorizationPolicy: Istio semantics, loading and validation (pure, no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from meshlib.config.model import AuthzAction
from meshlib.errors import ConfigError
from meshlib.identity.spiffe import SpiffeID
from policy.authz.authzdocs import ROUTES, SERVICES, TARGET_V1, decide, load, mesh, sa

RATINGS = sa("ratings")
DETAILS = sa("details")
BILLING = sa("billing", "pay")


def policy(spec: str, name: str = "p", namespace: str = "default") -> str:
    return (
        f"apiVersion: meshlib/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n"
        + "".join(f"  {line}\n" for line in spec.strip("\n").splitlines())
    )


ALLOW_RATINGS_GET = policy(
    """
target: {service: reviews}
rules:
- from: [{principals: ["shop.test/ns/default/sa/ratings"]}]
  to: [{methods: [GET]}]
""",
    "allow-ratings",
)
DENY_ADMIN = policy(
    """
target: {service: reviews}
action: DENY
rules:
- to: [{paths: ["/admin*"]}]
""",
    "deny-admin",
)

CLAIMS = {"iss": "https://idp.test", "sub": "alice", "groups": ["staff", "ops"], "org": {"id": "7"}}

#: (id, policies, caller, method, path, claims, allowed, rule fragment)
CASES: list[tuple[str, list[str], SpiffeID | None, str, str, Any, bool, str]] = [
    ("allow-match", [ALLOW_RATINGS_GET], RATINGS, "GET", "/r", None, True, "allow-ratings rule 0"),
    ("allow-wrong-method", [ALLOW_RATINGS_GET], RATINGS, "POST", "/r", None, False, "no rule"),
    ("allow-wrong-principal", [ALLOW_RATINGS_GET], DETAILS, "GET", "/r", None, False, "no rule"),
    ("allow-unauthenticated", [ALLOW_RATINGS_GET], None, "GET", "/r", None, False, "no rule"),
    (
        "deny-beats-allow",
        [ALLOW_RATINGS_GET, DENY_ADMIN],
        RATINGS,
        "GET",
        "/admin/x",
        None,
        False,
        "deny-admin rule 0 (DENY)",
    ),
    ("deny-only-others-open", [DENY_ADMIN], None, "POST", "/public", None, True, "default: open"),
    ("deny-only-match", [DENY_ADMIN], RATINGS, "GET", "/admin", None, False, "(DENY)"),
    (
        "principal-with-scheme-and-prefix",
        [policy('rules: [{from: [{principals: ["spiffe://shop.test/ns/pay/*"]}]}]')],
        BILLING,
        "GET",
        "/",
        None,
        True,
        "p rule 0",
    ),
    (
        "principal-star-needs-authentication",
        [policy('rules: [{from: [{principals: ["*"]}]}]')],
        None,
        "GET",
        "/",
        None,
        False,
        "no rule",
    ),
    (
        "principal-star-any-member",
        [policy('rules: [{from: [{principals: ["*"]}]}]')],
        sa("x", td="other.test"),
        "GET",
        "/",
        None,
        True,
        "p rule 0",
    ),
    (
        "namespace-match",
        [policy("rules: [{from: [{source: {namespaces: [pay]}}]}]")],
        BILLING,
        "GET",
        "/",
        None,
        True,
        "p rule 0",
    ),
    (
        "namespace-other",
        [policy("rules: [{from: [{namespaces: [pay]}]}]")],
        RATINGS,
        "GET",
        "/",
        None,
        False,
        "no rule",
    ),
    (
        "namespace-of-foreign-trust-domain-is-unknown",
        [policy("rules: [{from: [{namespaces: [pay]}]}]")],
        sa("billing", "pay", td="evil.test"),
        "GET",
        "/",
        None,
        False,
        "no rule",
    ),
    (
        "paths-prefix-and-suffix",
        [policy('rules: [{to: [{operation: {paths: ["/api/*", "*.css"]}}]}]')],
        None,
        "GET",
        "/static/site.css",
        None,
        True,
        "p rule 0",
    ),
    (
        "paths-exact-only",
        [policy('rules: [{to: [{paths: ["/api"]}]}]')],
        None,
        "GET",
        "/api/",
        None,
        False,
        "no rule",
    ),
    (
        "from-and-to-both-needed",
        [policy("rules: [{from: [{namespaces: [default]}], to: [{methods: [PUT]}]}]")],
        RATINGS,
        "GET",
        "/",
        None,
        False,
        "no rule",
    ),
    (
        "second-rule-matches",
        [policy("rules: [{to: [{methods: [PUT]}]}, {to: [{methods: [GET]}]}]")],
        None,
        "GET",
        "/",
        None,
        True,
        "p rule 1",
    ),
    (
        "when-claim-matches",
        [
            policy(
                'rules: [{when: [{key: "request.auth.claims[iss]", values: ["https://idp.test"]}]}]'
            )
        ],
        None,
        "GET",
        "/",
        CLAIMS,
        True,
        "p rule 0",
    ),
    (
        "when-claim-no-token",
        [policy('rules: [{when: [{key: "request.auth.claims[iss]", values: ["*"]}]}]')],
        None,
        "GET",
        "/",
        None,
        False,
        "no rule",
    ),
    (
        "when-list-claim",
        [policy('rules: [{when: [{key: "request.auth.claims[groups]", values: [ops]}]}]')],
        None,
        "GET",
        "/",
        CLAIMS,
        True,
        "p rule 0",
    ),
    (
        "when-nested-claim",
        [policy('rules: [{when: [{key: "request.auth.claims[org][id]", values: ["8"]}]}]')],
        None,
        "GET",
        "/",
        CLAIMS,
        False,
        "no rule",
    ),
    (
        "request-principal",
        [policy('rules: [{from: [{requestPrincipals: ["https://idp.test/alice"]}]}]')],
        None,
        "GET",
        "/",
        CLAIMS,
        True,
        "p rule 0",
    ),
    (
        "request-principal-other-subject",
        [policy('rules: [{from: [{requestPrincipals: ["https://idp.test/bob"]}]}]')],
        None,
        "GET",
        "/",
        CLAIMS,
        False,
        "no rule",
    ),
    (
        "allow-policy-with-no-rules-allows-nothing",
        [policy("target: {service: reviews}")],
        RATINGS,
        "GET",
        "/",
        None,
        False,
        "no rule",
    ),
    (
        "rule-with-nothing-matches-everything",
        [policy("rules: [{}]")],
        None,
        "DELETE",
        "/x",
        None,
        True,
        "p rule 0",
    ),
    (
        "other-namespace-policy-does-not-apply",
        [policy("rules: [{to: [{methods: [PUT]}]}]", namespace="pay")],
        None,
        "GET",
        "/",
        None,
        True,
        "default: open",
    ),
    (
        "policy-for-another-service-does-not-apply",
        [policy("target: {service: details}\nrules: [{to: [{methods: [PUT]}]}]")],
        None,
        "GET",
        "/",
        None,
        True,
        "default: open",
    ),
    (
        "deny-beats-traffic-target",
        [TARGET_V1, DENY_ADMIN.replace("/admin*", "/reviews/secret")],
        RATINGS,
        "GET",
        "/reviews/secret",
        None,
        False,
        "(DENY)",
    ),
    (
        "allow-policy-or-traffic-target",
        [TARGET_V1, ALLOW_RATINGS_GET.replace("sa/ratings", "sa/details")],
        DETAILS,
        "GET",
        "/anything",
        None,
        True,
        "allow-ratings rule 0",
    ),
]


@pytest.mark.parametrize(
    ("policies", "caller", "method", "path", "claims", "allowed", "rule"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_authorization_policy_table(
    policies: list[str],
    caller: SpiffeID | None,
    method: str,
    path: str,
    claims: Any,
    allowed: bool,
    rule: str,
) -> None:
    """SEC-13: one allow rule admits only its identity/method/path, DENY beats ALLOW, an ALLOW
    policy without rules allows nothing."""
    snapshot = load(mesh(), SERVICES, ROUTES, *policies)
    verdict = decide(snapshot, caller, method, path, claims=claims)
    assert verdict.allowed is allowed, verdict
    assert rule in verdict.rule


def test_health_endpoint_is_reachable_only_through_an_explicit_exemption() -> None:
    """SEC-13: under enforce, a health path is denied like any other until a policy exempts
    it; the exemption opens that path to anyone and nothing else."""
    snapshot = load(mesh("enforce"), SERVICES)
    assert not decide(snapshot, None, "GET", "/healthz").allowed
    assert not decide(snapshot, RATINGS, "GET", "/healthz").allowed
    probe = policy(
        "target: {service: reviews}\nrules: [{to: [{methods: [GET], paths: [/healthz]}]}]"
    )
    snapshot = load(mesh("enforce"), SERVICES, probe)
    assert decide(snapshot, None, "GET", "/healthz").allowed
    assert not decide(snapshot, None, "GET", "/healthz/../admin").allowed
    assert not decide(snapshot, None, "POST", "/healthz").allowed
    assert not decide(snapshot, RATINGS, "GET", "/reviews/1").allowed


def test_enforce_mode_and_namespace_wide_policy() -> None:
    snapshot = load(mesh("enforce"), SERVICES, policy("rules: [{to: [{methods: [GET]}]}]"))
    assert decide(snapshot, None, "GET", service="details.default").allowed
    assert not decide(snapshot, None, "POST", service="details.default").allowed
    assert not decide(snapshot, None, "GET", service="billing.pay").allowed


def test_loaded_model() -> None:
    snapshot = load(SERVICES, DENY_ADMIN, ALLOW_RATINGS_GET)
    deny, allow = snapshot.authorization_policies
    assert deny.action is AuthzAction.DENY and deny.service == "reviews.default"
    assert allow.action is AuthzAction.ALLOW
    assert allow.rules[0].sources[0].principals == ("shop.test/ns/default/sa/ratings",)
    assert allow.rules[0].operations[0].methods == frozenset({"GET"})


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ("target: {service: nope}", "spec.target.service", "not declared"),
        ("target: {service: billing.pay}", "spec.target.service", "outside the policy"),
        ("action: MAYBE", "spec.action", ""),
        ('rules: [{to: [{paths: ["/a*b*"]}]}]', "spec.rules[0].to[0].paths[0]", "'*' is allowed"),
        ('rules: [{to: [{paths: ["admin"]}]}]', "spec.rules[0].to[0].paths[0]", "start with '/'"),
        ('rules: [{to: [{methods: ["GE T"]}]}]', "spec.rules[0].to[0].methods[0]", "HTTP method"),
        (
            'rules: [{when: [{key: "source.ip", values: [x]}]}]',
            "spec.rules[0].when[0].key",
            "",
        ),
        ("rules: [{from: [{principal: [x]}]}]", "spec.rules[0].from[0]", "principal"),
    ],
)
def test_invalid_policies_are_rejected_with_a_clear_problem(
    spec: str, field: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(SERVICES, policy(spec))
    found = [p for p in caught.value.problems if p.field.startswith(field)]
    assert found, caught.value.problems
    assert any(message in p.message for p in found)
