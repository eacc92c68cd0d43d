"""SEC-10/SEC-11: JWT attack vectors and claim checks through MeshMiddleware (no sockets)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

import meshlib
from inbound.origin.conftest import (
    ISSUER,
    Recorder,
    bearer,
    call,
    ec_key,
    inline_rule,
    jwks,
    request_authentication,
    rsa_key,
    token,
)

KEYS = jwks((rsa_key(), "rsa-1"), (ec_key(), "ec-1"))


@pytest.fixture
def app_and_recorder(
    make_mesh: Callable[..., meshlib.Mesh],
) -> tuple[meshlib.MeshMiddleware, Recorder]:
    mesh = make_mesh(request_authentication(inline_rule(KEYS, ", algorithms: [RS256, ES256]")))
    recorder = Recorder()
    return meshlib.MeshMiddleware(recorder, mesh=mesh), recorder


def status_of(app: Any, value: str) -> int:
    status, headers = call(app, bearer(value))
    if status == 401:
        assert headers["x-mesh-reason"] == "unauthenticated"
    return status


def _b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_valid_tokens_pass_with_principal_and_claims(app_and_recorder: Any) -> None:
    app, recorder = app_and_recorder
    assert status_of(app, token()) == 200
    ext = recorder.scopes[0]["extensions"]["meshlib"]
    assert ext["request_principal"] == f"{ISSUER}/alice"
    assert ext["claims"]["sub"] == "alice"
    assert status_of(app, token(ec_key(), kid="ec-1", alg="ES256", sub="bob")) == 200
    assert recorder.scopes[1]["extensions"]["meshlib"]["request_principal"] == f"{ISSUER}/bob"


def test_missing_token_passes_without_principal(app_and_recorder: Any) -> None:
    app, recorder = app_and_recorder
    status, _ = call(app, [(b"x-other", b"1")])
    assert status == 200
    assert "meshlib" not in recorder.scopes[0].get("extensions", {})


def test_alg_none_is_refused(app_and_recorder: Any) -> None:
    app, recorder = app_and_recorder
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "alice", "aud": "shop", "exp": now + 60}
    for alg in ("none", "None", "NONE"):
        unsigned = f"{_b64({'alg': alg, 'kid': 'rsa-1'})}.{_b64(claims)}"
        assert status_of(app, unsigned + ".") == 401
        assert status_of(app, unsigned + "." + _b64(b"sig")) == 401
        assert status_of(app, unsigned) == 401
    assert recorder.scopes == []


def test_hs256_signed_with_the_public_key_is_refused(app_and_recorder: Any) -> None:
    app, _ = app_and_recorder
    pem = (
        rsa_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "mallory", "aud": "shop", "exp": now + 60}
    head = _b64({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"})
    signing_input = f"{head}.{_b64(claims)}".encode()
    import hashlib
    import hmac

    for secret in (pem, json.dumps(json.loads(KEYS)["keys"][0]).encode()):
        sig = hmac.new(secret, signing_input, hashlib.sha256).digest()
        assert status_of(app, f"{signing_input.decode()}.{_b64(sig)}") == 401


def test_algorithm_outside_the_allow_list_is_refused(
    make_mesh: Callable[..., meshlib.Mesh],
) -> None:
    mesh = make_mesh(request_authentication(inline_rule(KEYS, ", algorithms: [ES256]")))
    app = meshlib.MeshMiddleware(Recorder(), mesh=mesh)
    assert status_of(app, token()) == 401  # RS256 with a valid key: not allowed here
    assert status_of(app, token(ec_key(), kid="ec-1", alg="ES256")) == 200
    assert status_of(app, token(alg="RS384")) == 401


def test_key_type_mismatch_is_refused(app_and_recorder: Any) -> None:
    app, _ = app_and_recorder
    assert status_of(app, token(kid="ec-1")) == 401  # RS256 token naming the EC key
    assert status_of(app, token(ec_key(), kid="rsa-1", alg="ES256")) == 401


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"exp": -3600}, 401),  # expired
        ({"exp": -30}, 200),  # expired, but within the 60 s skew
        ({"exp": -90}, 401),  # beyond the skew
        ({"nbf": 3600}, 401),  # not yet valid
        ({"nbf": 30}, 200),  # within the skew
        ({"iat": 3600}, 401),  # issued in the future
        ({"exp": None}, 401),  # exp is required
        ({"aud": "billing"}, 401),  # wrong audience
        ({"aud": ["billing", "shop"]}, 200),  # audiences intersect
        ({"aud": None}, 401),  # audience required when configured
        ({"iss": "https://evil.test"}, 401),  # unknown issuer
    ],
)
def test_claim_checks(app_and_recorder: Any, claims: dict[str, Any], expected: int) -> None:
    app, _ = app_and_recorder
    now = int(time.time())  # offsets, resolved now: collection may be minutes earlier
    timed = {
        k: now + v if k in ("exp", "nbf", "iat") and v is not None else v for k, v in claims.items()
    }
    assert status_of(app, token(**timed)) == expected


def test_tampered_payload_is_refused(app_and_recorder: Any) -> None:
    app, _ = app_and_recorder
    head, _, sig = token().split(".")
    claims = jwt.decode(token(), options={"verify_signature": False})
    forged = f"{head}.{_b64({**claims, 'sub': 'admin'})}.{sig}"
    assert status_of(app, forged) == 401


def test_unknown_kid_and_hostile_headers_are_refused(app_and_recorder: Any) -> None:
    app, _ = app_and_recorder
    assert status_of(app, token(kid="nope")) == 401
    assert status_of(app, token(kid="../../etc/passwd")) == 401
    other = rsa_key("other")
    assert status_of(app, token(other, kid="rsa-1")) == 401  # right kid, wrong key
    # jku/x5u are ignored: the key still comes from the configured JWKS
    assert status_of(app, token(other, headers={"jku": "http://127.0.0.1:1/jwks"})) == 401
    assert status_of(app, token(headers={"crit": ["exp-ext"], "exp-ext": 1})) == 401


@pytest.mark.parametrize(
    "value",
    [b"Bearer", b"Bearer ", b"Basic dXNlcjpwYXNz", b"Bearer not.a.jwt", b"Bearer a b", b"bearer"],
)
def test_malformed_authorization_header_is_refused(app_and_recorder: Any, value: bytes) -> None:
    app, recorder = app_and_recorder
    status, headers = call(app, [(b"authorization", value)])
    assert status == 401 and headers["x-mesh-reason"] == "unauthenticated"
    assert recorder.scopes == []


def test_two_tokens_are_refused(app_and_recorder: Any) -> None:
    app, _ = app_and_recorder
    status, _ = call(app, bearer(token()) + bearer(token()))
    assert status == 401


def test_jwks_file_is_reread_when_it_changes(
    make_mesh: Callable[..., meshlib.Mesh], tmp_path: Path
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(jwks((rsa_key(), "rsa-1")))
    rule = f'{{issuer: "{ISSUER}", jwksFile: "{path}"}}'
    app = meshlib.MeshMiddleware(Recorder(), mesh=make_mesh(request_authentication(rule)))
    assert status_of(app, token()) == 200
    rotated = rsa_key("rotated")
    assert status_of(app, token(rotated, kid="rsa-2")) == 401
    path.write_text(jwks((rsa_key(), "rsa-1"), (rotated, "rsa-2"), (ec_key(), "ec-1")))
    assert status_of(app, token(rotated, kid="rsa-2")) == 200
    path.write_text("{not json")
    assert status_of(app, token(rotated, kid="rsa-2")) == 200  # bad file: old keys kept
    path.write_text('{"keys": ' + "[" * 100_000)  # a nesting bomb: not a RecursionError
    assert status_of(app, token(rotated, kid="rsa-2")) == 200
    path.write_bytes(b'{"keys": [\xff]}')  # not UTF-8
    assert status_of(app, token(rotated, kid="rsa-2")) == 200


def test_missing_jwks_file_fails_closed(
    make_mesh: Callable[..., meshlib.Mesh], tmp_path: Path
) -> None:
    rule = f'{{issuer: "{ISSUER}", jwksFile: "{tmp_path / "absent.json"}"}}'
    app = meshlib.MeshMiddleware(Recorder(), mesh=make_mesh(request_authentication(rule)))
    assert status_of(app, token()) == 401
    status, _ = call(app, [])
    assert status == 200


def test_rules_of_another_service_do_not_apply(make_mesh: Callable[..., meshlib.Mesh]) -> None:
    other = "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: ratings}\nspec: {}\n---\n"
    text = other + request_authentication(inline_rule(KEYS), "  target: {service: ratings}\n")
    app = meshlib.MeshMiddleware(Recorder(), mesh=make_mesh(text))
    assert status_of(app, "garbage") == 200  # no rule for productpage: header not examined


AUTHZ = """
---
apiVersion: meshlib/v1
kind: AuthorizationPolicy
metadata: {name: users}
spec:
  target: {service: productpage}
  rules:
  - from: [{requestPrincipals: ["https://issuer.test/alice"]}]
    to: [{paths: ["/alice*"]}]
  - to: [{paths: ["/admin*"]}]
    when: [{key: "request.auth.claims[groups]", values: [admins]}]
"""


def test_authorization_policies_match_verified_tokens(
    make_mesh: Callable[..., meshlib.Mesh],
) -> None:
    mesh = make_mesh(request_authentication(inline_rule(KEYS)) + AUTHZ)
    app = meshlib.MeshMiddleware(Recorder(), mesh=mesh)
    assert call(app, bearer(token()), "/alice/x")[0] == 200
    assert call(app, bearer(token(sub="bob")), "/alice/x")[0] == 403
    assert call(app, [], "/alice/x")[0] == 403  # no token, rule needs a principal
    assert call(app, bearer(token(groups=["admins"])), "/admin")[0] == 200
    assert call(app, bearer(token(groups=["users"])), "/admin")[0] == 403
    forged = token(rsa_key("other"), groups=["admins"])
    status, headers = call(app, bearer(forged), "/admin")
    assert status == 401 and headers["x-mesh-reason"] == "unauthenticated"
