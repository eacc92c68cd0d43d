"""The attempt-request fast paths agree with the public httpx API they replace: the endpoint URL
(swapping fields of httpx's parsed URL) with ``URL.copy_with``, for every shape of URL and
endpoint the mesh produces; the attempt request (assembled directly, deadline header appended)
with ``httpx.Request()`` and the header setter."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from meshlib.config.model import Endpoint
from meshlib.outbound import call
from meshlib.outbound.call import _endpoint_url
from meshlib.policy.balancer import EndpointState


@pytest.mark.parametrize(
    "url",
    [
        "http://reviews/",
        "http://reviews.shop.svc.cluster.local/r/1?x=1&y=%20z",
        "http://reviews:9080/a%2Fb/c",
        "https://reviews/secure",
        "http://user:pw@reviews/path#frag",
    ],
)
@pytest.mark.parametrize(
    ("host", "port"), [("127.0.0.1", 8001), ("::1", 9000), ("Backend.Local", 80), ("10.0.0.7", 443)]
)
@pytest.mark.parametrize("tls", [False, True])
def test_fast_path_equals_copy_with(url: str, host: str, port: int, tls: bool) -> None:
    original = httpx.URL(url)
    scheme = "https" if tls else original.scheme
    expected = original.copy_with(scheme=scheme, host=host, port=port)
    got = _endpoint_url(original, host, port, tls)
    assert got == expected
    assert str(got) == str(expected)
    assert (got.scheme, got.host, got.port, got.raw_path) == (
        expected.scheme,
        expected.host,
        expected.port,
        expected.raw_path,
    )
    assert original == httpx.URL(url)  # the caller's URL is untouched


def test_the_installed_httpx_takes_the_fast_paths() -> None:
    assert call._private_shapes_ok()
    assert call._FAST


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Accept": "*/*", "X-Trace": "1"},
        {"X-Mesh-Timeout-Ms": "10", "Accept": "*/*"},  # the caller's deadline is replaced
        [("x-mesh-timeout-ms", "10"), ("accept", "*/*"), ("X-MESH-TIMEOUT-MS", "20")],
    ],
)
@pytest.mark.parametrize(
    "extensions",
    [
        {},
        {"timeout": {"connect": 5.0, "read": 0.5, "write": None, "pool": 5.0}, "other": 1},
        {"timeout": {}},
        {"timeout": {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}},  # httpx.Timeout(5)
        {"timeout": {"connect": 0.1, "read": 0.1, "write": 0.1, "pool": 0.1}},
        {"timeout": {"connect": None, "read": None, "write": None, "pool": None}},
    ],
)
@pytest.mark.parametrize(("timeout", "remaining"), [(None, None), (1.0, 2.5), (0.25, 0.0001)])
def test_attempt_request_equals_the_public_constructor(
    monkeypatch: pytest.MonkeyPatch,
    headers: Any,
    extensions: dict[str, Any],
    timeout: float | None,
    remaining: float | None,
) -> None:
    original = httpx.Request(
        "POST", "http://reviews/r?x=1", headers=headers, content=b"body", extensions=extensions
    )
    before = (list(original.headers.raw), dict(original.extensions))
    state = EndpointState(Endpoint("10.0.0.7:8001"))
    fast = call._attempt_request(original, state, timeout, remaining, True)
    monkeypatch.setattr(call, "_FAST", False)
    slow = call._attempt_request(original, state, timeout, remaining, True)
    assert (fast.method, fast.url, fast.headers.raw, fast.extensions, fast.stream) == (
        slow.method,
        slow.url,
        slow.headers.raw,
        slow.extensions,
        slow.stream,
    )
    assert set(vars(fast)) == set(vars(slow))
    assert vars(fast.headers) == vars(slow.headers)  # the header copy's own shape too
    if timeout is not None:  # each phase capped, a shorter client setting kept
        current = extensions.get("timeout") or {}
        assert fast.extensions["timeout"] == {
            k: timeout if current.get(k) is None else min(timeout, current[k])
            for k in ("connect", "read", "write", "pool")
        }
    assert (list(original.headers.raw), dict(original.extensions)) == before  # untouched
    fast.headers["x-new"] = "1"
    assert "x-new" not in original.headers
