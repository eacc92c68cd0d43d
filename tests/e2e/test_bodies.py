"""Request and response bodies versus retries (real sockets, both drivers).

NET-5: only bodies the mesh can replay (≤ 64 KiB, known length) are retried, byte for byte;
larger or length-less streamed bodies pass through once. DATA-2: once response headers reached
the caller the call is committed: a failure while reading the body surfaces, never a retry.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from e2e.conftest import service_yaml

pytestmark = pytest.mark.timeout(30)

KIB = 1024
RETRYABLE_POST = """---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: reviews-policy, namespace: default}
spec:
  target: {service: reviews}
  retries: {attempts: 2, retryOn: [5xx, reset], retryable: true}
  circuitBreaker: {consecutiveFailures: 1000}
  outlierDetection: {consecutiveFailures: 1000}
"""


def payload(size: int) -> bytes:
    """Deterministic, non-repeating-looking bytes so a reordered or truncated replay shows."""
    block = hashlib.sha256(str(size).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def streamed(mode: str, data: bytes, chunk: int = 64 * KIB) -> Any:
    """``data`` as a generator body of the right colour for the caller's driver."""
    if mode == "sync":

        def gen() -> Iterator[bytes]:
            for i in range(0, len(data), chunk):
                yield data[i : i + chunk]

        return gen()

    async def agen() -> AsyncIterator[bytes]:
        for i in range(0, len(data), chunk):
            yield data[i : i + chunk]

    return agen()


def attempts(r: httpx.Response) -> list[int | None]:
    return [a.status for a in r.extensions["mesh_decision"].attempts]


# --- NET-5 ---------------------------------------------------------------------------------------


def test_small_body_is_retried_byte_identical(caller, make_mesh, echo_factory) -> None:
    a = echo_factory("a")
    a.set_status(503, times=1)
    c = caller.bind(make_mesh(service_yaml("reviews", [a.port]) + RETRYABLE_POST))
    body = payload(10 * KIB)
    r = c.post("http://reviews/upload", content=body)
    assert r.status_code == 200
    assert attempts(r) == [503, 200]
    digest = hashlib.sha256(body).hexdigest()
    assert a.bodies == [(len(body), digest), (len(body), digest)]


def test_body_at_the_buffer_cap_is_retried(caller, make_mesh, echo_factory) -> None:
    a = echo_factory("a")
    a.set_status(503, times=1)
    c = caller.bind(make_mesh(service_yaml("reviews", [a.port]) + RETRYABLE_POST))
    body = payload(64 * KIB)
    r = c.post("http://reviews/upload", content=body)
    assert r.status_code == 200
    assert attempts(r) == [503, 200]
    assert a.bodies == [(len(body), hashlib.sha256(body).hexdigest())] * 2


def test_body_over_the_buffer_cap_is_not_retried(caller, make_mesh, echo_factory) -> None:
    a = echo_factory("a")
    a.set_status(503, times=1)
    c = caller.bind(make_mesh(service_yaml("reviews", [a.port]) + RETRYABLE_POST))
    body = payload(64 * KIB + 1)
    r = c.post("http://reviews/upload", content=body)
    assert r.status_code == 503  # the failure is surfaced, not replayed
    assert attempts(r) == [503]
    assert a.bodies == [(len(body), hashlib.sha256(body).hexdigest())]


def test_streamed_body_with_content_length_is_buffered_and_retried(
    caller, make_mesh, echo_factory
) -> None:
    a = echo_factory("a")
    a.set_status(503, times=1)
    c = caller.bind(make_mesh(service_yaml("reviews", [a.port]) + RETRYABLE_POST))
    body = payload(10 * KIB)
    r = c.post(
        "http://reviews/upload",
        content=streamed(c.mode, body, chunk=KIB),
        headers={"content-length": str(len(body))},
    )
    assert r.status_code == 200
    assert attempts(r) == [503, 200]
    assert a.bodies == [(len(body), hashlib.sha256(body).hexdigest())] * 2


def test_large_streamed_body_without_length_streams_through_once(
    caller, make_mesh, echo_factory
) -> None:
    a = echo_factory("a")
    a.set_status(503, times=1)
    c = caller.bind(make_mesh(service_yaml("reviews", [a.port]) + RETRYABLE_POST))
    body = payload(10 * 1000 * 1000)
    r = c.post("http://reviews/upload", content=streamed(c.mode, body))
    assert r.status_code == 503
    assert attempts(r) == [503]
    assert a.bodies == [(len(body), hashlib.sha256(body).hexdigest())]
    assert "content-length" not in a.records[0].headers
    assert a.records[0].headers.get("transfer-encoding") == "chunked"


def test_small_chunked_body_without_length_is_not_retried(caller, make_mesh, echo_factory) -> None:
    a = echo_factory("a")
    a.set_status(503, times=1)
    c = caller.bind(make_mesh(service_yaml("reviews", [a.port]) + RETRYABLE_POST))
    body = b"small chunked body"
    r = c.post("http://reviews/upload", content=streamed(c.mode, body, chunk=5))
    assert r.status_code == 503
    assert attempts(r) == [503]
    assert a.bodies == [(len(body), hashlib.sha256(body).hexdigest())]


def test_unreplayable_body_is_not_retried_even_after_reset(
    caller, make_mesh, raw_server_factory
) -> None:
    raw = raw_server_factory("r")
    raw.set_mode("reset_before_headers", times=1)
    c = caller.bind(make_mesh(service_yaml("reviews", [raw.port]) + RETRYABLE_POST))
    result = c.outcome("POST", "http://reviews/upload", content=streamed(c.mode, b"abc" * 100))
    assert isinstance(result, (httpx.ReadError, httpx.RemoteProtocolError)), result
    assert [a.outcome for a in result.decision.attempts] == ["reset"]  # type: ignore[union-attr]
    assert raw.requests == 1


# --- DATA-2: committed responses -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_reset_mid_body_surfaces_while_reading_and_is_not_retried(
    caller, make_mesh, raw_server_factory, method
) -> None:
    raw = raw_server_factory("r")
    raw.set_mode("headers_then_reset", times=1)
    policy = RETRYABLE_POST.replace("retryOn: [5xx, reset]", "retryOn: [5xx, reset, timeout]")
    c = caller.bind(make_mesh(service_yaml("reviews", [raw.port]) + policy))
    result = c.outcome(method, "http://reviews/report", headers={"x-request-id": "r1"})
    assert isinstance(result, (httpx.ReadError, httpx.RemoteProtocolError)), result
    assert raw.requests == 1
    assert raw.side_effects["r1"] == 1


def test_reset_mid_body_while_streaming_reaches_the_reader(caller, make_mesh, echo_factory) -> None:
    """The caller already holds the 200 (status, headers) when the body breaks."""
    a = echo_factory("a")
    a.set_behavior("reset_mid_body", times=1)
    c = caller.bind(make_mesh(service_yaml("reviews", [a.port]) + RETRYABLE_POST))
    if c.mode == "sync":
        with c._client.stream("GET", "http://reviews/report") as response:
            status = response.status_code
            decision = response.extensions["mesh_decision"]
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                response.read()
    else:

        async def go() -> tuple[int, Any]:
            async with c._client.stream("GET", "http://reviews/report") as response:
                code, record = response.status_code, response.extensions["mesh_decision"]
                with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                    await response.aread()
                return code, record

        status, decision = c._run(go())
    assert status == 200
    assert [x.outcome for x in decision.attempts] == ["ok"]
    assert a.requests == 1
