"""The RequestAuthentication kind: model and validation problems."""

from __future__ import annotations

import pytest

from meshlib.config.loader import load_text
from meshlib.config.model import JwtLocation
from meshlib.errors import ConfigError, Problem

SERVICE = "---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\nspec: {}\n"


def doc(rule: str, target: str = "") -> str:
    return (
        "apiVersion: meshlib/v1\nkind: RequestAuthentication\nmetadata: {name: jwt}\n"
        f"spec:\n{target}  jwtRules:\n  - {rule}\n" + SERVICE
    )


def problems(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_text(text)
    return list(info.value.problems)


def has(found: list[Problem], field: str, contains: str) -> bool:
    return any(p.field == field and contains in p.message for p in found)


def test_defaults_and_full_rule() -> None:
    snap = load_text(doc('{issuer: "https://i", jwksUri: "https://i/jwks"}'))
    (ra,) = snap.request_authentications
    assert ra.service is None and ra.namespace == "default"
    rule = ra.rules[0]
    assert rule.algorithms == ("RS256", "ES256") and rule.clock_skew == 60.0
    assert rule.from_headers == (JwtLocation("authorization", "Bearer "),)
    assert rule.audiences == ()
    full = doc(
        '{issuer: "https://i", audiences: [a, b], jwksFile: /etc/jwks.json, '
        "algorithms: [PS256, ES384], clockSkew: 5s, "
        'fromHeaders: [{name: X-Jwt, prefix: ""}]}',
        "  target: {service: reviews}\n",
    )
    (ra,) = load_text(full).request_authentications
    assert ra.service == "reviews.default"
    rule = ra.rules[0]
    assert rule.audiences == ("a", "b") and rule.jwks_file == "/etc/jwks.json"
    assert rule.algorithms == ("PS256", "ES384") and rule.clock_skew == 5.0
    assert rule.from_headers == (JwtLocation("x-jwt", ""),)


@pytest.mark.parametrize(
    ("alg", "message"),
    [("none", "never allowed"), ("HS256", "HMAC"), ("RS1", "unknown algorithm")],
)
def test_bad_algorithms(alg: str, message: str) -> None:
    found = problems(doc(f'{{issuer: "https://i", jwksUri: "https://i/j", algorithms: [{alg}]}}'))
    assert has(found, "spec.jwtRules[0].algorithms[0]", message)


def test_jwks_source_problems() -> None:
    assert has(problems(doc('{issuer: "https://i"}')), "spec.jwtRules[0]", "exactly one")
    both = '{issuer: "https://i", jwksUri: "https://i/j", jwksFile: /x}'
    assert has(problems(doc(both)), "spec.jwtRules[0]", "exactly one")
    assert has(
        problems(doc('{issuer: "https://i", jwksUri: "file:///etc/passwd"}')),
        "spec.jwtRules[0].jwksUri",
        "http(s)",
    )
    assert has(
        problems(doc('{issuer: "https://i", jwks: "[1, 2]"}')), "spec.jwtRules[0].jwks", "JWK Set"
    )


def test_skew_duplicates_targets_and_unknown_fields() -> None:
    skew = '{issuer: "https://i", jwksUri: "https://i/j", clockSkew: 10m}'
    assert has(problems(doc(skew)), "spec.jwtRules[0].clockSkew", "limit")
    dup = (
        '{issuer: "https://i", jwksUri: "https://i/j"}\n'
        '  - {issuer: "https://i", jwks: "{\\"keys\\": []}"}'
    )
    assert has(problems(doc(dup)), "spec.jwtRules[1].issuer", "already")
    ghost = doc('{issuer: "https://i", jwksUri: "https://i/j"}', "  target: {service: ghost}\n")
    assert has(problems(ghost), "spec.target.service", "not declared")
    extra = '{issuer: "https://i", jwksUri: "https://i/j", outputClaimToHeaders: []}'
    assert any("outputClaimToHeaders" in str(p) for p in problems(doc(extra)))
