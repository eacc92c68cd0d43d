"""Origin-authentication fixtures: keys, JWKS documents, token minting and a fake ASGI app."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import meshlib

ISSUER = "https://issuer.test"
AUDIENCE = "shop"


@functools.cache
def rsa_key(name: str = "rsa") -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key(name: str = "ec") -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def jwk(key: Any, kid: str) -> dict[str, Any]:
    """The public JWK of ``key`` with ``kid``."""
    if isinstance(key, rsa.RSAPrivateKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        data = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**data, "kid": kid}


def jwks(*keys: tuple[Any, str]) -> str:
    return json.dumps({"keys": [jwk(k, kid) for k, kid in keys]})


def token(
    key: Any = None,
    *,
    kid: str | None = "rsa-1",
    alg: str = "RS256",
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A token from ISSUER for AUDIENCE, valid for an hour, with ``claims`` overriding."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 3600,
    }
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    head = dict(headers or {})
    if kid is not None:
        head["kid"] = kid
    return jwt.encode(payload, key if key is not None else rsa_key(), algorithm=alg, headers=head)


def request_authentication(rule: str, target: str = "") -> str:
    return (
        "apiVersion: meshlib/v1\nkind: RequestAuthentication\nmetadata: {name: jwt}\n"
        f"spec:\n{target}  jwtRules:\n  - {rule}\n"
    )


def inline_rule(document: str, extra: str = "") -> str:
    return (
        f"{{issuer: {json.dumps(ISSUER)}, audiences: [{AUDIENCE}], "
        f"jwks: {json.dumps(document)}{extra}}}"
    )


SERVICE = "---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {name: productpage}\nspec: {}\n"


class Recorder:
    """An ASGI app that records the scopes it was given and answers 200."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def http_scope(headers: list[tuple[bytes, bytes]], path: str = "/") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def acall(app: Any, scope: dict[str, Any]) -> tuple[int, dict[str, str]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}


def call(
    app: Any, headers: list[tuple[bytes, bytes]], path: str = "/"
) -> tuple[int, dict[str, str]]:
    return asyncio.run(acall(app, http_scope(headers, path)))


def bearer(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {value}".encode())]


@pytest.fixture
def make_mesh() -> Iterator[Callable[..., meshlib.Mesh]]:
    from prometheus_client import CollectorRegistry

    made: list[meshlib.Mesh] = []

    def make(text: str, **kwargs: Any) -> meshlib.Mesh:
        kwargs.setdefault("service", "productpage")
        kwargs.setdefault("registry", CollectorRegistry())
        mesh = meshlib.Mesh.from_text(text + SERVICE, **kwargs)
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()
