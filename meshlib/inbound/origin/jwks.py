"""JWKS sources for origin authentication: inline, file and URL, with a non-blocking cache.

Requests never wait on a slow JWKS endpoint for a key the cache already holds. A URL source is
fetched (plain httpx, never through the mesh) when first needed, again when its TTL expires,
and early when a token names an unknown ``kid`` — at most once per ``min_refresh_interval``,
so a flood of random ``kid``s cannot turn into a flood of fetches. A request whose key is not
cached waits for the fetch that concerns it for at most ``max_wait`` seconds, then is refused
(fail closed); the fetch carries on in the background. A failed fetch keeps the old keys.

A fetch is bounded in size and time whatever the endpoint does: the body is streamed and the
fetch refused as soon as it passes :data:`MAX_JWKS_BYTES` (before reading anything if
``Content-Length`` already says so), and connect, headers and body together must finish within
one deadline (``timeout``), which a per-read timeout alone would not give against a body that
trickles in a byte at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt

from meshlib.config.authnkind import ALGORITHMS
from meshlib.config.authnmodel import JwtRule
from meshlib.config.values import parse_json

log = logging.getLogger("meshlib.origin")

#: JWKS documents above this size are refused (a key set is a few KiB).
MAX_JWKS_BYTES = 1024 * 1024
_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


class JwksFetchError(ValueError):
    """A JWKS URL answered with something that is not a usable key set document (status,
    size, encoding or deadline); the message names the URL and the limit."""


class KeySet:
    """The usable signing keys (RSA and EC public keys) of one JWK Set."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self._by_kid: dict[str, list[dict[str, Any]]] = {}
        for key in keys:
            kid = key.get("kid")
            if isinstance(kid, str):
                self._by_kid.setdefault(kid, []).append(key)
        self._built: dict[tuple[int, str], jwt.PyJWK] = {}
        self._lock = threading.Lock()

    @classmethod
    def parse(cls, data: str | bytes) -> KeySet:
        """Parse a JWK Set; keys that are not RSA/EC signing keys are dropped. ValueError if
        the document is not a JWK Set, a nesting bomb included (depth is checked first)."""
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        doc = parse_json(text)
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError('not a JWK Set (expected {"keys": [...]})')
        usable = [
            k
            for k in doc["keys"]
            if isinstance(k, dict)
            and k.get("kty") in ("RSA", "EC")
            and k.get("use", "sig") == "sig"
            and "d" not in k  # a private key published by mistake is not used
        ]
        return cls(usable)

    def knows(self, kid: str | None) -> bool:
        return bool(self.keys) if kid is None else kid in self._by_kid

    def candidates(self, kid: str | None, alg: str) -> list[jwt.PyJWK]:
        """Keys that may verify a token signed with ``alg`` (and naming ``kid``): the key type
        must match the algorithm's family — an RSA key never verifies HS*/ES*, an EC key of
        another curve never verifies — which is what defeats algorithm confusion."""
        family = ALGORITHMS.get(alg)
        pool = self.keys if kid is None else self._by_kid.get(kid, [])
        out: list[jwt.PyJWK] = []
        for key in pool:
            if family is None or key.get("kty") != family:
                continue
            if key.get("alg") not in (None, alg):
                continue
            if family == "EC" and key.get("crv") != _CURVES.get(alg):
                continue
            built = self._build(key, alg)
            if built is not None:
                out.append(built)
        return out

    def _build(self, key: dict[str, Any], alg: str) -> jwt.PyJWK | None:
        cache_key = (id(key), alg)
        with self._lock:
            built = self._built.get(cache_key)
        if built is None:
            try:
                built = jwt.PyJWK(key, algorithm=alg)
            except jwt.PyJWTError:
                return None
            with self._lock:
                self._built[cache_key] = built
        return built


class JwksSource:
    """Where one rule's keys come from. :meth:`lookup` never blocks on I/O for long."""

    def current(self) -> KeySet | None:
        raise NotImplementedError

    async def lookup(self, kid: str | None) -> KeySet | None:
        return self.current()


class InlineJwks(JwksSource):
    def __init__(self, text: str) -> None:
        try:
            self._keys: KeySet | None = KeySet.parse(text)
        except ValueError:
            self._keys = None  # the loader validated it; stay fail-closed regardless

    def current(self) -> KeySet | None:
        return self._keys


class FileJwks(JwksSource):
    """A JWKS file, re-read when its mtime or size changes; a bad or missing file keeps the
    keys read last (none at first: tokens are refused)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._signature: tuple[int, int] | None = None
        self._keys: KeySet | None = None
        self._lock = threading.Lock()

    def current(self) -> KeySet | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return self._keys
        signature = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if signature == self._signature:
                return self._keys
            self._signature = signature
        try:
            if st.st_size > MAX_JWKS_BYTES:
                raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
            with open(self.path, "rb") as f:
                data = f.read(MAX_JWKS_BYTES + 1)  # the file may have grown since the stat
            if len(data) > MAX_JWKS_BYTES:
                raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
            keys = KeySet.parse(data)
        except (OSError, ValueError) as exc:
            log.warning("jwks file %s unusable, keeping the previous keys: %s", self.path, exc)
            return self._keys
        self._keys = keys
        return keys


class UrlJwks(JwksSource):
    """A JWKS fetched over HTTP(S) with a plain httpx client (never through the mesh)."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        ttl: float = 300.0,
        min_refresh_interval: float = 10.0,
        timeout: float = 3.0,
        max_wait: float = 1.0,
    ) -> None:
        self.url = url
        self.clock = clock
        self.ttl = ttl
        self.min_refresh_interval = min_refresh_interval
        self.timeout = timeout
        self.max_wait = max_wait
        self.fetches = 0  # attempts started (for tests and diagnostics)
        self.last_error: str | None = None
        self._keys: KeySet | None = None
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._task: asyncio.Task[bool] | None = None
        self._lock = threading.Lock()

    def current(self) -> KeySet | None:
        if self._fetched_at is None or self.clock() - self._fetched_at >= self.ttl:
            self._kick()
        return self._keys

    async def lookup(self, kid: str | None) -> KeySet | None:
        keys = self.current()
        if keys is not None and keys.knows(kid):
            return keys  # the common case: no waiting, whatever the endpoint is doing
        task = self._kick()
        if task is None:
            return keys
        # On timeout the fetch goes on in the background and this request is refused.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), self.max_wait)
        return self._keys

    def _kick(self) -> asyncio.Task[bool] | None:
        """The refresh in flight on this loop, or a new one if allowed now; else ``None``."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        with self._lock:
            task = self._task
            if task is not None and not task.done():
                return task if task.get_loop() is loop else None
            now = self.clock()
            if self._last_attempt is not None and now - self._last_attempt < (
                self.min_refresh_interval
            ):
                return None
            self._last_attempt = now
            self._task = task = loop.create_task(self._fetch())
            return task

    async def refresh(self) -> bool:
        """Fetch now (whatever the refresh interval says); True if new keys were installed."""
        with self._lock:
            self._last_attempt = self.clock()
        return await self._fetch()

    async def _fetch(self) -> bool:
        self.fetches += 1
        try:
            try:
                body = await asyncio.wait_for(self._download(), self.timeout)
            except asyncio.TimeoutError:
                raise JwksFetchError(
                    f"jwksUri {self.url}: no complete response within the {self.timeout:g} s "
                    "deadline (connect, headers and body together)"
                ) from None
            keys = KeySet.parse(body)
        except Exception as exc:  # a background fetch must never raise unobserved
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("jwks fetch from %s failed, keeping cached keys: %s", self.url, exc)
            return False
        self._keys = keys
        self._fetched_at = self.clock()
        self.last_error = None
        return True

    async def _download(self) -> bytes:
        """The body of a 200 response, streamed and refused past :data:`MAX_JWKS_BYTES`: at
        most that plus one network read is ever held. The caller bounds the time."""
        where = f"jwksUri {self.url}"
        async with (
            httpx.AsyncClient(
                timeout=self.timeout, trust_env=False, follow_redirects=False
            ) as client,
            client.stream(
                "GET",
                self.url,
                # identity: the cap counts the bytes that are held, which a compressed body
                # (decoded a whole network read at a time) would multiply
                headers={"accept": "application/json", "accept-encoding": "identity"},
            ) as response,
        ):
            if response.status_code != 200:
                raise JwksFetchError(f"{where}: HTTP {response.status_code}")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                raise JwksFetchError(
                    f"{where}: Content-Encoding {encoding!r} refused (identity was asked for)"
                )
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_JWKS_BYTES:
                raise JwksFetchError(
                    f"{where}: Content-Length {declared} is over the {MAX_JWKS_BYTES}-byte cap "
                    "(nothing read)"
                )
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksFetchError(
                        f"{where}: body is over the {MAX_JWKS_BYTES}-byte cap (stopped after "
                        f"reading {len(body)} bytes)"
                    )
            return bytes(body)


class JwksStore:
    """The JWKS sources of every rule, keyed by where the keys come from, so a policy reload
    keeps the caches (and does not refetch every URL)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, **url_options: Any) -> None:
        self.clock = clock
        self.url_options = url_options
        self._sources: dict[tuple[str, str], JwksSource] = {}
        self._lock = threading.Lock()

    def source(self, rule: JwtRule) -> JwksSource:
        if rule.jwks_uri is not None:
            key = ("uri", rule.jwks_uri)
        elif rule.jwks_file is not None:
            key = ("file", rule.jwks_file)
        else:
            key = ("inline", rule.jwks or "")
        with self._lock:
            found = self._sources.get(key)
            if found is None:
                found = self._sources[key] = self._make(*key)
            return found

    def _make(self, kind: str, where: str) -> JwksSource:
        if kind == "uri":
            return UrlJwks(where, clock=self.clock, **self.url_options)
        if kind == "file":
            return FileJwks(where)
        return InlineJwks(where)
