"""``/v1/tokens`` on a real registry (uvicorn, strict mTLS, SQLite), through the client and raw
HTTP: admin only (a workload SVID gets a counted 403), the secret shown once, only its hash
stored, listing with states, revocation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from meshlib.control.client import (
    AsyncRegistryClient,
    RegistryError,
    RegistryNotFound,
    RegistryRefused,
)
from meshlib.control.tokens import TOKENS, consume, parse_token
from meshlib.control.wire import TokenInfo, TokenIssued
from tests.control.conftest import TD, RunningRegistry, StartRegistry
from tests.control.test_app_consistency import scrape

pytestmark = pytest.mark.timeout(30)

WORKLOAD = f"spiffe://{TD}/ns/default/sa/reviews"
ADMIN = f"spiffe://{TD}/ns/meshlib-system/sa/meshctl"
T = TypeVar("T")


def on_app_loop(registry: RunningRegistry, coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on the registry's own loop (its store belongs to it)."""
    assert registry.app.loop is not None
    return asyncio.run_coroutine_threadsafe(coroutine, registry.app.loop).result(10)


def test_create_list_revoke_through_the_client(registry: RunningRegistry) -> None:
    client = registry.client()
    before = time.time()
    issued = client.create_token(WORKLOAD)
    assert isinstance(issued, TokenIssued) and issued.spiffe_id == WORKLOAD
    id, secret = parse_token(issued.token)
    assert id == issued.id
    assert before + 900 <= issued.expires_at <= time.time() + 900  # the default: 15 min

    short = client.create_token(f"spiffe://{TD}/ns/default/sa/ratings", ttl=60)
    listed = {t.id: t for t in client.tokens()}
    assert set(listed) == {issued.id, short.id}
    assert listed[issued.id] == TokenInfo(
        issued.id,
        WORKLOAD,
        "unused",
        listed[issued.id].created_at,
        issued.expires_at,
        ADMIN,
    )
    assert listed[short.id].expires_at - listed[short.id].created_at == 60

    # the store has the hash, never the secret; the listing has neither
    _, items = on_app_loop(registry, registry.app.store.range(TOKENS))
    assert secret.encode() not in b"".join(i.value for i in items)
    raw = registry.http().get("/v1/tokens")
    assert raw.status_code == 200 and "secret" not in raw.text and secret not in raw.text

    revoked_at = client.revoke_token(issued.id)
    assert before <= revoked_at <= time.time()
    states = {t.id: t.state for t in client.tokens()}
    assert states == {issued.id: "revoked", short.id: "unused"}
    assert client.revoke_token(issued.id) == revoked_at  # again: the first time is kept
    with pytest.raises(RegistryNotFound, match="no join token 'ffffffffffff'"):
        client.revoke_token("ffffffffffff")


def test_a_consumed_token_lists_as_used(registry: RunningRegistry) -> None:
    client = registry.client()
    issued = client.create_token(WORKLOAD)
    on_app_loop(registry, consume(registry.app.store, issued.token, time.time(), serial="ab12"))
    [listed] = client.tokens()
    assert (listed.state, listed.used_by_serial) == ("used", "ab12")
    assert listed.used_at is not None


def test_bad_requests_name_what_is_wrong(registry: RunningRegistry) -> None:
    http = registry.http()
    cases = {
        "spiffe://other.test/ns/default/sa/reviews": "of trust domain 'other.test'",
        f"spiffe://{TD}/reviews": "is not a workload ID",
    }
    for spiffe_id, reason in cases.items():
        answer = http.post("/v1/tokens", json={"spiffe_id": spiffe_id})
        assert answer.status_code == 400 and reason in answer.json()["error"], answer.text
    answer = http.post("/v1/tokens", json={"spiffe_id": WORKLOAD, "ttl": 86401})
    assert answer.status_code == 400
    assert answer.json()["error"] == "ttl must be 60..86400 seconds (1 min..24 h), got 86401"
    answer = http.post("/v1/tokens", json={"ttl": 60})
    assert (answer.status_code, answer.json()["error"]) == (400, "field 'spiffe_id' is missing")
    answer = http.put("/v1/tokens", json={})
    assert answer.status_code == 405 and answer.headers["Allow"] == "GET, POST"
    assert http.get("/v1/tokens/abc").status_code == 405
    assert registry.client().tokens() == ()  # nothing was stored


def test_a_workload_svid_is_refused_403_and_counted(registry_factory: StartRegistry) -> None:
    registry = registry_factory(metrics=True)
    issued = registry.client().create_token(WORKLOAD)
    workload = registry.client(registry.issue("default", "reviews"))
    with pytest.raises(RegistryRefused) as create:
        workload.create_token(WORKLOAD)
    assert create.value.status == 403
    assert create.value.message == (
        f"{WORKLOAD} is not an admin of the registry: it may not create join tokens "
        "(POST /v1/tokens)"
    )
    with pytest.raises(RegistryRefused, match="may not list join tokens"):
        workload.tokens()
    with pytest.raises(RegistryRefused, match="may not revoke join tokens"):
        workload.revoke_token(issued.id)
    assert registry.app.refusals == 3
    counted = scrape(registry.http())
    assert counted[("mesh_registry_refusals_total", (("verb", "tokens"),))] == 3
    [still] = registry.client().tokens()
    assert still.state == "unused"  # the refused revoke changed nothing


@pytest.mark.anyio
async def test_the_async_client_has_the_token_calls(registry: RunningRegistry) -> None:
    async with AsyncRegistryClient(registry.url, svid_dir=str(registry.admin_svid)) as client:
        issued = await client.create_token(WORKLOAD, ttl=120)
        assert [t.id for t in await client.tokens()] == [issued.id]
        assert await client.revoke_token(issued.id) > 0
        with pytest.raises(RegistryError) as refused:
            await client.create_token("spiffe://other.test/ns/a/sa/b")
        assert refused.value.status == 400
