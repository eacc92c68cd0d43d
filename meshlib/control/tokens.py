"""Join tokens: one-time secrets an admin mints for one workload SPIFFE ID, which a new host
trades once for its first SVID (docs/security.md, "Join tokens").

A token reads ``mlt1.<id>.<secret>``: ``id`` is 12 hex characters, public (listing and revoking
name it); ``secret`` is 32 random bytes, URL-safe base64 without padding. The store keeps only
``sha256(secret)``, so reading the store (or a backup of it) gives no usable token.

Pure core, no I/O (time and randomness are arguments, so tests run on a fake clock):
:func:`mint`, :func:`parse_token`, :func:`check` (every refusal a :class:`TokenRefused` with its
reason), :func:`state_of`. Drivers over a :class:`~meshlib.control.store.Store`, one key per
token at ``/registry/tokens/<id>``: :func:`issue_token`, :func:`list_tokens`,
:func:`revoke_token`, :func:`verify_token` and :func:`consume`.

Consumption is one compare-and-set write of the record with ``used_at`` set, at the mod
revision the record was read at: of two concurrent consumers exactly one write lands, and the
other one's :class:`~meshlib.control.store.Conflict` becomes "token already used".
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import hashlib
import hmac
import json
import random
import re
import secrets
from dataclasses import asdict, dataclass, replace
from typing import Any

from meshlib.control.store import Conflict, Store
from meshlib.identity.spiffe import SpiffeID, SpiffeIDError

__all__ = [
    "DEFAULT_TOKEN_TTL",
    "MAX_TOKEN_TTL",
    "MIN_TOKEN_TTL",
    "PREFIX",
    "TOKENS",
    "TokenRecord",
    "TokenRefused",
    "TokenRequestError",
    "TokenState",
    "check",
    "consume",
    "issue_token",
    "list_tokens",
    "mint",
    "parse_token",
    "revoke_token",
    "state_of",
    "token_key",
    "verify_token",
    "when",
    "workload_id",
]

#: The version tag every token starts with (a later format gets another).
PREFIX = "mlt1"
#: The store prefix of token records.
TOKENS = "/registry/tokens/"
DEFAULT_TOKEN_TTL = 15 * 60.0
MIN_TOKEN_TTL = 60.0
MAX_TOKEN_TTL = 24 * 3600.0
ID_BYTES = 6
SECRET_BYTES = 32
#: Length of a 32-byte secret in base64 without padding.
SECRET_CHARS = 43
_ID = re.compile(r"^[0-9a-f]{12}$")
_SECRET = re.compile(r"^[A-Za-z0-9_-]{43}$")
_WORKLOAD_PATH = re.compile(r"^/ns/[^/]+/sa/[^/]+$")
#: A fresh id collides with a stored one with odds of 2^-48 per token: three tries is plenty.
_ID_TRIES = 3

# Secrets come from the OS unless a test passes a seeded rng: never the registry's own
# (maybe seeded) random.Random.
_SYSTEM = secrets.SystemRandom()


class TokenRefused(Exception):
    """A token that may not be used; ``reason`` says why (never containing the secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenRequestError(ValueError):
    """A request to mint a token that cannot be honoured (a bad SPIFFE ID or TTL)."""


class TokenState(str, enum.Enum):
    UNUSED = "unused"
    USED = "used"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass(frozen=True)
class TokenRecord:
    """A token as the store keeps it; times are wall-clock Unix seconds."""

    id: str
    spiffe_id: str
    secret_sha256: str
    created_at: float
    expires_at: float
    created_by: str
    used_at: float | None = None
    #: The serial number (hex) of the SVID the token bought, when the signer says it.
    used_by_serial: str | None = None
    revoked_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # every field, each a JSON scalar

    @classmethod
    def from_json(cls, body: object, where: str = "token record") -> TokenRecord:
        """Parse a stored record; :class:`ValueError` names the field that is wrong."""
        if not isinstance(body, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(body).__name__}")

        def field(name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
            value = body.get(name)
            if value is None and optional:
                return None
            if value is None or isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{where}: field {name!r} is missing or of the wrong type")
            return value

        number = (int, float)
        used_at = field("used_at", number, True)
        revoked_at = field("revoked_at", number, True)
        return cls(
            field("id", str),
            field("spiffe_id", str),
            field("secret_sha256", str),
            float(field("created_at", number)),
            float(field("expires_at", number)),
            field("created_by", str),
            None if used_at is None else float(used_at),
            field("used_by_serial", str, True),
            None if revoked_at is None else float(revoked_at),
        )

    def encode(self) -> bytes:
        return json.dumps(self.to_json()).encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> TokenRecord:
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where}: not JSON ({exc})") from None
        return cls.from_json(body, where)


# -- the pure core ---------------------------------------------------------------------------


def when(stamp: float) -> str:
    """A Unix time as ISO 8601 UTC (``2026-12-06T09:12:03Z``), as refusals and listings say it."""
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_key(id: str) -> str:
    """The store key of token ``id``."""
    return f"{TOKENS}{id}"


def workload_id(text: object, trust_domain: str) -> SpiffeID:
    """``text`` as a workload ID of ``trust_domain`` (``spiffe://TD/ns/NS/sa/SA``), else
    :class:`TokenRequestError` saying what is wrong with it."""
    if not isinstance(text, str):
        raise TokenRequestError(f"spiffe_id must be a string, got {type(text).__name__}")
    try:
        found = SpiffeID.parse(text)
    except SpiffeIDError as exc:
        raise TokenRequestError(f"spiffe_id {text!r} is not a SPIFFE ID: {exc}") from None
    if found.trust_domain != trust_domain:
        raise TokenRequestError(
            f"spiffe_id {text!r} is of trust domain {found.trust_domain!r}; this registry "
            f"issues identities of {trust_domain!r} only"
        )
    if not _WORKLOAD_PATH.match(found.path):
        raise TokenRequestError(
            f"spiffe_id {text!r} is not a workload ID (spiffe://{trust_domain}/ns/NS/sa/SA)"
        )
    return found


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def mint(
    spiffe_id: str,
    ttl: float,
    now: float,
    author: str,
    rng: random.Random | None = None,
    *,
    trust_domain: str,
) -> tuple[str, TokenRecord]:
    """A new token for ``spiffe_id`` valid ``ttl`` seconds from ``now``: its text (the only
    place the secret ever is) and the record to store. :class:`TokenRequestError` if the ID is
    not a workload ID of ``trust_domain`` or ``ttl`` is outside 1 min..24 h."""
    workload_id(spiffe_id, trust_domain)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TokenRequestError(f"ttl must be a number of seconds, got {type(ttl).__name__}")
    if not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
        raise TokenRequestError(
            f"ttl must be {MIN_TOKEN_TTL:g}..{MAX_TOKEN_TTL:g} seconds (1 min..24 h), got {ttl:g}"
        )
    source = rng if rng is not None else _SYSTEM
    id = source.getrandbits(8 * ID_BYTES).to_bytes(ID_BYTES, "big").hex()
    raw = source.getrandbits(8 * SECRET_BYTES).to_bytes(SECRET_BYTES, "big")
    secret = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    record = TokenRecord(id, spiffe_id, _hash(secret), now, now + float(ttl), author)
    return f"{PREFIX}.{id}.{secret}", record


def parse_token(text: object) -> tuple[str, str]:
    """``mlt1.<id>.<secret>`` as (id, secret), else :class:`TokenRefused` naming what is wrong
    (the reason never repeats the secret: it may be a real one, mistyped)."""
    if not isinstance(text, str):
        raise TokenRefused(f"a join token is a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise TokenRefused("the join token is empty")
    parts = text.split(".")
    if parts[0] != PREFIX:
        raise TokenRefused(f"not a join token: it must start with '{PREFIX}.'")
    if len(parts) != 3:
        raise TokenRefused(
            f"malformed join token: {PREFIX}.<id>.<secret> has 3 parts separated by '.', "
            f"this has {len(parts)}"
        )
    _, id, secret = parts
    if not _ID.match(id):
        raise TokenRefused(
            f"malformed join token: its id must be 12 lower-case hex characters, got {id[:24]!r}"
        )
    if not _SECRET.match(secret):
        raise TokenRefused(
            f"malformed join token: its secret must be {SECRET_CHARS} URL-safe base64 "
            f"characters, it has {len(secret)}"
            + ("" if len(secret) != SECRET_CHARS else " with a character outside A-Z a-z 0-9 - _")
        )
    try:
        base64.urlsafe_b64decode(secret + "=")
    except (binascii.Error, ValueError):  # pragma: no cover - the pattern admits only valid text
        raise TokenRefused("malformed join token: its secret is not base64") from None
    return id, secret


def check(record: TokenRecord | None, secret: str, now: float) -> TokenRecord:
    """``record`` if ``secret`` may be traded for its identity at ``now``, else
    :class:`TokenRefused` with the reason.

    The secret is compared first (in constant time): a caller who does not hold the secret
    learns only that it does not match, nothing of the token's life. Then revoked, used,
    expired: the token is valid on ``[created_at, expires_at)``.
    """
    if record is None:
        raise TokenRefused("unknown token")
    if not hmac.compare_digest(_hash(secret), record.secret_sha256):
        raise TokenRefused("token secret does not match")
    if record.revoked_at is not None:
        raise TokenRefused(f"token was revoked at {when(record.revoked_at)}")
    if record.used_at is not None:
        raise TokenRefused(f"token already used at {when(record.used_at)}")
    if now >= record.expires_at:
        raise TokenRefused(f"token expired at {when(record.expires_at)}")
    return record


def state_of(record: TokenRecord, now: float) -> TokenState:
    """What a listing says of ``record`` at ``now``: revoked, then used, then expired."""
    if record.revoked_at is not None:
        return TokenState.REVOKED
    if record.used_at is not None:
        return TokenState.USED
    if now >= record.expires_at:
        return TokenState.EXPIRED
    return TokenState.UNUSED


# -- the drivers over a store ------------------------------------------------------------------


async def _read(store: Store, id: str) -> tuple[TokenRecord | None, int]:
    """Token ``id`` and its mod revision (None, 0 when absent)."""
    key = token_key(id)
    _, items = await store.range(key)
    for item in items:
        if item.key == key:
            return TokenRecord.decode(item.value, key), item.mod_revision
    return None, 0


async def issue_token(
    store: Store,
    spiffe_id: str,
    *,
    ttl: float = DEFAULT_TOKEN_TTL,
    now: float,
    author: str,
    trust_domain: str,
    rng: random.Random | None = None,
) -> tuple[str, TokenRecord]:
    """Mint a token (:func:`mint`) and store its record, never over an existing one."""
    for _ in range(_ID_TRIES):
        token, record = mint(spiffe_id, ttl, now, author, rng, trust_domain=trust_domain)
        try:
            await store.put(token_key(record.id), record.encode(), if_mod_rev=0)
        except Conflict:
            continue
        return token, record
    raise TokenRefused(f"could not find a free token id in {_ID_TRIES} tries")  # pragma: no cover


async def list_tokens(store: Store) -> list[TokenRecord]:
    """Every stored token, oldest first."""
    _, items = await store.range(TOKENS)
    records = [TokenRecord.decode(item.value, item.key) for item in items]
    return sorted(records, key=lambda r: (r.created_at, r.id))


async def revoke_token(store: Store, id: str, now: float) -> TokenRecord | None:
    """Mark token ``id`` revoked at ``now`` (a revoked one keeps its first time); None if
    there is no such token."""
    lost: Conflict | None = None
    # A lap is lost only to a write that landed between our read and ours (a consume, another
    # revoke); the next read sees it, so a few laps always suffice.
    for _ in range(_ID_TRIES):
        record, revision = await _read(store, id)
        if record is None:
            return None
        if record.revoked_at is not None:
            return record
        revoked = replace(record, revoked_at=now)
        try:
            await store.put(token_key(id), revoked.encode(), if_mod_rev=revision)
        except Conflict as exc:
            lost = exc
            continue
        return revoked
    assert lost is not None
    raise lost


async def verify_token(store: Store, token_text: object, now: float) -> TokenRecord:
    """The record ``token_text`` names if it could be consumed at ``now`` (:func:`check`),
    without consuming it; :class:`TokenRefused` otherwise."""
    id, secret = parse_token(token_text)
    record, _ = await _read(store, id)
    return check(record, secret, now)


async def consume(
    store: Store, token_text: object, now: float, *, serial: str | None = None
) -> TokenRecord:
    """Trade ``token_text`` for its record, once: :func:`check` it, then write it back used
    (``used_at=now``, ``used_by_serial=serial``) at the revision it was read at. Returns the
    used record; :class:`TokenRefused` if it may not be used or another consumer won."""
    id, secret = parse_token(token_text)
    record, revision = await _read(store, id)
    found = check(record, secret, now)
    used = replace(found, used_at=now, used_by_serial=serial)
    try:
        await store.put(token_key(id), used.encode(), if_mod_rev=revision)
    except Conflict:
        # Another write landed since the read: a consumer (or a revoke) won. Say which.
        again, _ = await _read(store, id)
        check(again, secret, now)
        raise TokenRefused("token already used") from None
    return used
