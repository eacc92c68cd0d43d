"""SEC-12: a hostile or broken ``jwksUri`` cannot grow the process or hold a fetch open: the body
is streamed and refused past the size cap (before reading anything when Content-Length says so),
connect + headers + body share one deadline, and a refused fetch keeps the keys already held.
Each case is served by a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import functools
import gzip
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from harness import ServerHandle, run_uvicorn

from inbound.origin.conftest import jwks, rsa_key
from meshlib.inbound.origin import KeySet, UrlJwks
from meshlib.inbound.origin.jwks import MAX_JWKS_BYTES

pytestmark = pytest.mark.timeout(20)

#: The most one network read adds past the cap (httpcore reads 64 KiB at a time).
CHUNK = 64 * 1024
GOOD = jwks((rsa_key(), "rsa-1"))
#: Bounds on the hostile bodies, so the server's loops end even if the client never leaves.
ENDLESS_LIMIT = 64 * 1024 * 1024
TRICKLE_LIMIT = 300


class HostileJwks:
    """Serves the good JWKS (``mode="good"``) or one of the bodies a fetch must survive.
    Counts the body bytes handed to uvicorn and notes when the client went away."""

    def __init__(self) -> None:
        self.mode = "good"
        self.sent = 0
        self.disconnected = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.sent = 0
        self.disconnected.clear()
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            self.disconnected.set()

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self._respond(send, gone)
        finally:
            watcher.cancel()

    async def _respond(self, send: Any, gone: asyncio.Event) -> None:
        mode = self.mode
        headers = [(b"content-type", b"application/json")]

        async def body(data: bytes, more: bool) -> None:
            self.sent += len(data)
            await send({"type": "http.response.body", "body": data, "more_body": more})

        async def start(extra: list[tuple[bytes, bytes]]) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": headers + extra})

        if mode in ("good", "at-cap", "at-cap-chunked", "over-cap", "over-cap-chunked"):
            size = {"good": len(GOOD), "at-cap": MAX_JWKS_BYTES}.get(
                mode.removesuffix("-chunked"), MAX_JWKS_BYTES + 1
            )
            data = GOOD.encode().ljust(size)  # JSON allows trailing whitespace
            if mode.endswith("-chunked"):  # no Content-Length: uvicorn sends it chunked
                await start([])
                for i in range(0, len(data), CHUNK):
                    await body(data[i : i + CHUNK], True)
                await body(b"", False)
            else:
                await start([(b"content-length", str(len(data)).encode())])
                await body(data, False)
        elif mode == "endless":
            await start([])
            block = b" " * CHUNK
            while not gone.is_set() and self.sent < ENDLESS_LIMIT:
                await body(block, True)
                await asyncio.sleep(0)  # let the disconnect be seen
        elif mode == "trickle":
            await start([])
            for _ in range(TRICKLE_LIMIT):  # a byte every 100 ms, well inside any read timeout
                await body(b" ", True)
                try:
                    await asyncio.wait_for(gone.wait(), 0.1)
                    return
                except asyncio.TimeoutError:
                    pass
        elif mode == "gzip":  # compressed although identity was asked for
            data = _gzip_bomb()
            await start([(b"content-encoding", b"gzip")])
            await body(data, False)
        elif mode == "huge-length":
            # A Content-Length far over the cap, then nothing until the client leaves.
            await start([(b"content-length", str(10 * 1024**3).encode())])
            await asyncio.wait_for(gone.wait(), 10)
        else:  # pragma: no cover - a typo in a test
            raise AssertionError(mode)


@functools.cache
def _gzip_bomb() -> bytes:
    """64 MiB of JSON gzipped to ~64 KiB, compressed once: compressing it inside the request
    took over a second on a loaded machine, past the fetch's deadline (seen in a test run)."""
    return gzip.compress(GOOD.encode().ljust(64 * MAX_JWKS_BYTES), compresslevel=1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served() -> Iterator[tuple[HostileJwks, ServerHandle]]:
    app = HostileJwks()
    handle = run_uvicorn(app, name="hostile-jwks")
    yield app, handle
    handle.stop()


def _primed(handle: ServerHandle, timeout: float = 1.0) -> tuple[UrlJwks, KeySet]:
    """A source that has fetched the good key set once."""
    source = UrlJwks(f"{handle.url}/jwks", clock=Clock(), timeout=timeout)
    assert asyncio.run(source.refresh()) is True
    keys = source.current()
    assert keys is not None and keys.knows("rsa-1")
    return source, keys


def _refused(source: UrlJwks, keys: KeySet) -> str:
    """Refresh, expect a refusal that kept ``keys``; the error."""
    assert asyncio.run(source.refresh()) is False
    assert source.current() is keys  # the good key set stays in force
    error = source.last_error
    assert error is not None and source.url in error
    return error


def _bytes_read(error: str) -> int:
    found = re.search(r"stopped after reading (\d+) bytes", error)
    assert found is not None, error
    return int(found.group(1))


def test_endless_body_is_cut_at_the_cap(served: tuple[HostileJwks, ServerHandle]) -> None:
    app, handle = served
    source, keys = _primed(handle, timeout=10.0)  # the size cap, not the deadline, must stop it
    app.mode = "endless"
    error = _refused(source, keys)
    assert f"over the {MAX_JWKS_BYTES}-byte cap" in error
    assert MAX_JWKS_BYTES < _bytes_read(error) <= MAX_JWKS_BYTES + CHUNK
    # the client hung up: the server did not have to reach its own bound
    assert app.disconnected.wait(5)
    assert app.sent < ENDLESS_LIMIT


def test_trickling_body_is_cut_at_the_overall_deadline(
    served: tuple[HostileJwks, ServerHandle],
) -> None:
    """A byte every 100 ms never trips a 0.5 s per-read timeout; only one deadline over
    connect + headers + body ends the fetch."""
    app, handle = served
    source, keys = _primed(handle, timeout=0.5)
    app.mode = "trickle"
    error = _refused(source, keys)
    assert "0.5 s deadline" in error and "connect, headers and body" in error
    assert app.disconnected.wait(5)
    assert 0 < app.sent < TRICKLE_LIMIT


@pytest.mark.parametrize("mode", ["over-cap", "over-cap-chunked"])
def test_body_one_byte_over_the_cap_is_refused(
    served: tuple[HostileJwks, ServerHandle], mode: str
) -> None:
    app, handle = served
    source, keys = _primed(handle)
    app.mode = mode
    error = _refused(source, keys)
    assert f"over the {MAX_JWKS_BYTES}-byte cap" in error
    if mode == "over-cap":  # Content-Length told: refused from the header alone
        assert f"Content-Length {MAX_JWKS_BYTES + 1}" in error and "nothing read" in error
    else:
        assert MAX_JWKS_BYTES < _bytes_read(error) <= MAX_JWKS_BYTES + CHUNK


@pytest.mark.parametrize("mode", ["at-cap", "at-cap-chunked"])
def test_body_exactly_at_the_cap_is_accepted(
    served: tuple[HostileJwks, ServerHandle], mode: str
) -> None:
    app, handle = served
    source, keys = _primed(handle)
    app.mode = mode
    assert asyncio.run(source.refresh()) is True
    fresh = source.current()
    assert fresh is not None and fresh is not keys and fresh.knows("rsa-1")
    assert app.sent == MAX_JWKS_BYTES and source.last_error is None


def test_content_length_over_the_cap_is_refused_before_reading(
    served: tuple[HostileJwks, ServerHandle],
) -> None:
    """The server announces 10 GiB and sends nothing: the refusal comes from the header (not
    from the deadline), and no body byte was waited for."""
    app, handle = served
    source, keys = _primed(handle, timeout=10.0)
    app.mode = "huge-length"
    error = _refused(source, keys)
    assert f"Content-Length {10 * 1024**3} is over the {MAX_JWKS_BYTES}-byte cap" in error
    assert "nothing read" in error and "deadline" not in error
    assert app.disconnected.wait(5)
    assert app.sent == 0


def test_compressed_body_is_refused(served: tuple[HostileJwks, ServerHandle]) -> None:
    """A gzip body would be decoded a whole network read at a time (a 64 KiB read can be 64 MiB
    decoded), so the fetch asks for identity and refuses anything else."""
    app, handle = served
    source, keys = _primed(handle, timeout=10.0)  # the header, not the deadline, must stop it
    _gzip_bomb()  # compressed before the fetch, outside its deadline
    app.mode = "gzip"
    error = _refused(source, keys)
    assert "Content-Encoding 'gzip' refused" in error
