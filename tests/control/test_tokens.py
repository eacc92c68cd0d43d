"""Join tokens (meshlib/control/tokens.py): the pure rules on a fake clock and seeded
randomness, then the store drivers on every store of the contract suite (one-time consumption
under concurrency, across a SQLite reopen, only the secret's hash stored)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import pytest
from policy.fakes import FakeClock

from meshlib.control.sqlite import SQLiteStore
from meshlib.control.store import Item, Put, Store
from meshlib.control.tokens import (
    DEFAULT_TOKEN_TTL,
    TokenRecord,
    TokenRefused,
    TokenRequestError,
    TokenState,
    check,
    consume,
    issue_token,
    list_tokens,
    mint,
    parse_token,
    revoke_token,
    state_of,
    token_key,
    verify_token,
    when,
)
from tests.control.fakes import ForwardingStore
from tests.control.test_store_contract import MARKS, STORES

TD = "shop.test"
WORKLOAD = f"spiffe://{TD}/ns/default/sa/reviews"
ADMIN = f"spiffe://{TD}/ns/meshlib-system/sa/meshctl"
#: A wall clock: 2026-12-06T09:00:00Z.
T0 = 1796547600.0


def minted(ttl: float = DEFAULT_TOKEN_TTL, seed: int = 7) -> tuple[str, TokenRecord, str]:
    token, record = mint(WORKLOAD, ttl, T0, ADMIN, random.Random(seed), trust_domain=TD)
    _, secret = parse_token(token)
    return token, record, secret


# -- the pure core -----------------------------------------------------------------------------


def test_mint_shape_record_and_only_the_hash_of_the_secret() -> None:
    token, record, secret = minted()
    prefix, id, _ = token.split(".")
    assert prefix == "mlt1" and len(id) == 12 and int(id, 16) >= 0
    assert len(secret) == 43 and "=" not in secret
    assert record == TokenRecord(
        id, WORKLOAD, hashlib.sha256(secret.encode()).hexdigest(), T0, T0 + 900, ADMIN
    )
    assert secret not in str(record.to_json())
    assert TokenRecord.from_json(record.to_json()) == record
    assert TokenRecord.decode(record.encode(), "k") == record
    # seeded: the same seed makes the same token, another seed another one
    assert minted()[0] == token and minted(seed=8)[0] != token


def test_secrets_come_from_the_os_without_an_rng() -> None:
    first, _ = mint(WORKLOAD, 60, T0, ADMIN, trust_domain=TD)
    second, _ = mint(WORKLOAD, 60, T0, ADMIN, trust_domain=TD)
    assert first != second


def test_expiry_is_exact_at_the_boundary_on_a_fake_clock() -> None:
    _, record, secret = minted(ttl=60)
    clock = FakeClock(T0)
    assert check(record, secret, clock()) is record
    clock.advance(59.999)
    assert check(record, secret, clock()) is record
    assert state_of(record, clock()) is TokenState.UNUSED
    clock.now = T0 + 60  # valid on [created_at, expires_at)
    with pytest.raises(TokenRefused) as info:
        check(record, secret, clock())
    assert info.value.reason == "token expired at 2026-12-06T09:01:00Z"
    assert state_of(record, clock()) is TokenState.EXPIRED


def test_revoked_used_unknown_and_wrong_secret_each_say_why() -> None:
    _, record, secret = minted()
    refusals = {
        "unknown": (None, secret),
        "revoked": (TokenRecord(**{**record.to_json(), "revoked_at": T0 + 5}), secret),
        "used": (TokenRecord(**{**record.to_json(), "used_at": T0 + 7}), secret),
        "secret": (record, secret[:-1] + ("A" if secret[-1] != "A" else "B")),
    }
    reasons = {}
    for name, (found, given) in refusals.items():
        with pytest.raises(TokenRefused) as info:
            check(found, given, T0 + 10)
        reasons[name] = info.value.reason
    assert reasons == {
        "unknown": "unknown token",
        "revoked": "token was revoked at 2026-12-06T09:00:05Z",
        "used": "token already used at 2026-12-06T09:00:07Z",
        "secret": "token secret does not match",
    }
    assert state_of(refusals["revoked"][0], T0) is TokenState.REVOKED  # type: ignore[arg-type]
    assert state_of(refusals["used"][0], T0) is TokenState.USED  # type: ignore[arg-type]


def test_a_wrong_secret_learns_nothing_of_the_tokens_life() -> None:
    _, record, _ = minted()
    _, _, other_secret = minted(seed=9)
    used = TokenRecord(**{**record.to_json(), "used_at": T0, "revoked_at": T0})
    with pytest.raises(TokenRefused, match=r"^token secret does not match$"):
        check(used, other_secret, T0 + 10_000)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "the join token is empty"),
        ("   ", "the join token is empty"),
        (42, "a join token is a string, got int"),
        ("mlt2.0123456789ab." + "A" * 43, "not a join token: it must start with 'mlt1.'"),
        ("Bearer mlt1.x.y", "not a join token: it must start with 'mlt1.'"),
        ("mlt1.0123456789ab", "3 parts separated by '.', this has 2"),
        ("mlt1.0123456789ab." + "A" * 43 + ".x", "this has 4"),
        ("mlt1.0123456789AB." + "A" * 43, "its id must be 12 lower-case hex characters"),
        ("mlt1.0123." + "A" * 43, "its id must be 12 lower-case hex characters, got '0123'"),
        ("mlt1.0123456789ab." + "A" * 42, f"{43} URL-safe base64 characters, it has 42"),
        ("mlt1.0123456789ab." + "A" * 42 + "+", "with a character outside A-Z a-z 0-9 - _"),
    ],
)
def test_malformed_tokens_are_refused_with_a_clear_reason(text: object, reason: str) -> None:
    with pytest.raises(TokenRefused) as info:
        parse_token(text)
    assert reason in info.value.reason


def test_a_malformed_secret_is_never_echoed() -> None:
    secret = "S3cr3t" * 7  # 42 characters: one short
    with pytest.raises(TokenRefused) as info:
        parse_token(f"mlt1.0123456789ab.{secret}")
    assert secret not in info.value.reason and "S3cr3t" not in info.value.reason


@pytest.mark.parametrize(
    ("ttl", "ok"), [(59.9, False), (60, True), (900, True), (86400, True), (86400.5, False)]
)
def test_ttl_bounds_one_minute_to_a_day(ttl: float, ok: bool) -> None:
    if ok:
        assert mint(WORKLOAD, ttl, T0, ADMIN, trust_domain=TD)[1].expires_at == T0 + ttl
        return
    with pytest.raises(TokenRequestError, match=r"ttl must be 60\.\.86400 seconds"):
        mint(WORKLOAD, ttl, T0, ADMIN, trust_domain=TD)


@pytest.mark.parametrize(
    ("spiffe_id", "reason"),
    [
        ("spiffe://other.test/ns/default/sa/reviews", "of trust domain 'other.test'"),
        (f"spiffe://{TD}", "is not a workload ID"),
        (f"spiffe://{TD}/reviews", "is not a workload ID"),
        (f"spiffe://{TD}/ns/default/sa/reviews/x", "is not a workload ID"),
        ("https://shop.test/ns/a/sa/b", "is not a SPIFFE ID"),
    ],
)
def test_only_workload_ids_of_the_trust_domain(spiffe_id: str, reason: str) -> None:
    with pytest.raises(TokenRequestError, match=reason):
        mint(spiffe_id, 900, T0, ADMIN, trust_domain=TD)


def test_times_read_as_utc() -> None:
    assert when(T0) == "2026-12-06T09:00:00Z"


# -- the drivers, on every store -----------------------------------------------------------------


@pytest.fixture(params=[pytest.param(name, marks=MARKS.get(name, [])) for name in sorted(STORES)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with ExitStack() as stack:
        made = STORES[request.param](tmp_path, FakeClock(), 1000, stack)
        yield made
        asyncio.run(made.close())


class ReadTogether(ForwardingStore):
    """A store whose reads of a token wait until ``n`` readers have read: two consumers both
    read the unused record before either writes (the interleaving a real network allows)."""

    def __init__(self, inner: Store, n: int) -> None:
        super().__init__(inner)
        self.barrier = asyncio.Barrier(n)
        self.armed = True

    async def range(self, prefix: str) -> tuple[int, list[Item]]:
        found = await self.inner.range(prefix)
        if self.armed:
            await self.barrier.wait()
        return found

    async def put(
        self, key: str, value: bytes, *, lease: int | None = None, if_mod_rev: int | None = None
    ) -> int:
        self.armed = False  # the loser's re-read after its conflict must not wait
        return await self.inner.put(key, value, lease=lease, if_mod_rev=if_mod_rev)

    async def put_all(self, puts: Sequence[Put]) -> int:
        self.armed = False
        return await self.inner.put_all(puts)


async def _issue(store: Store, ttl: float = DEFAULT_TOKEN_TTL) -> tuple[str, TokenRecord]:
    return await issue_token(
        store, WORKLOAD, ttl=ttl, now=T0, author=ADMIN, trust_domain=TD, rng=random.Random(3)
    )


async def _outcomes(*attempts: object) -> list[object]:
    return list(await asyncio.gather(*attempts, return_exceptions=True))  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_a_token_is_consumed_once_then_refused(store: Store) -> None:
    async def scenario() -> None:
        token, record = await _issue(store)
        assert await verify_token(store, token, T0 + 1) == record  # a look uses nothing
        used = await consume(store, token, T0 + 2, serial="0a1b")
        assert (used.used_at, used.used_by_serial) == (T0 + 2, "0a1b")
        with pytest.raises(TokenRefused, match=r"^token already used at 2026-12-06T09:00:02Z$"):
            await consume(store, token, T0 + 3)
        [listed] = await list_tokens(store)
        assert listed == used and state_of(listed, T0 + 3) is TokenState.USED

    asyncio.run(scenario())


@pytest.mark.timeout(10)
def test_two_concurrent_consumers_exactly_one_wins(store: Store) -> None:
    async def scenario(racing: Store) -> list[object]:
        token, _ = await _issue(store)
        return await _outcomes(consume(racing, token, T0 + 1), consume(racing, token, T0 + 1))

    async def both() -> None:
        # as scheduled, and with both reads forced to land before either write
        for racing in (store, ReadTogether(store, 2)):
            outcomes = await scenario(racing)
            won = [o for o in outcomes if isinstance(o, TokenRecord)]
            lost = [o for o in outcomes if isinstance(o, TokenRefused)]
            assert len(won) == 1 and len(lost) == 1, outcomes
            assert lost[0].reason.startswith("token already used")

    asyncio.run(both())


@pytest.mark.timeout(10)
def test_expired_revoked_and_unknown_tokens_are_refused_by_the_driver(store: Store) -> None:
    async def scenario() -> None:
        token, record = await _issue(store, ttl=60)
        with pytest.raises(TokenRefused, match=r"^token expired at 2026-12-06T09:01:00Z$"):
            await consume(store, token, T0 + 60)
        other, other_record = await issue_token(
            store, WORKLOAD, now=T0, author=ADMIN, trust_domain=TD, rng=random.Random(4)
        )
        revoked = await revoke_token(store, other_record.id, T0 + 5)
        assert revoked is not None and revoked.revoked_at == T0 + 5
        again = await revoke_token(store, other_record.id, T0 + 9)  # keeps its first time
        assert again is not None and again.revoked_at == T0 + 5
        with pytest.raises(TokenRefused, match=r"^token was revoked at 2026-12-06T09:00:05Z$"):
            await consume(store, other, T0 + 6)
        assert await revoke_token(store, "ffffffffffff", T0) is None
        with pytest.raises(TokenRefused, match=r"^unknown token$"):
            await consume(store, "mlt1.ffffffffffff." + "A" * 43, T0)
        states = [state_of(r, T0 + 61) for r in await list_tokens(store)]
        assert sorted(states) == sorted([TokenState.EXPIRED, TokenState.REVOKED])
        assert [r.id for r in await list_tokens(store)] == sorted([record.id, other_record.id])

    asyncio.run(scenario())


@pytest.mark.timeout(10)
def test_only_the_hash_is_in_the_store(store: Store, tmp_path: Path) -> None:
    async def scenario() -> tuple[str, str]:
        token, record = await _issue(store)
        await consume(store, token, T0 + 1)
        _, items = await store.range("")
        raw = b"".join(i.key.encode() + i.value for i in items)
        _, secret = parse_token(token)
        assert secret.encode() not in raw and record.secret_sha256.encode() in raw
        assert [i.key for i in items if i.key.startswith("/registry/tokens/")] == [
            token_key(record.id)
        ]
        return secret, record.secret_sha256

    secret, digest = asyncio.run(scenario())
    if isinstance(store, SQLiteStore):  # and on disk: the database and its write-ahead log
        on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
        assert digest.encode() in on_disk and secret.encode() not in on_disk


@pytest.mark.timeout(10)
def test_consumption_survives_a_sqlite_reopen(tmp_path: Path) -> None:
    async def first() -> str:
        store = SQLiteStore(tmp_path)
        try:
            token, _ = await _issue(store)
            await consume(store, token, T0 + 1)
            return token
        finally:
            await store.close()

    async def second(token: str) -> None:
        store = SQLiteStore(tmp_path)
        try:
            with pytest.raises(TokenRefused, match=r"^token already used at"):
                await consume(store, token, T0 + 2)
        finally:
            await store.close()

    asyncio.run(second(asyncio.run(first())))
