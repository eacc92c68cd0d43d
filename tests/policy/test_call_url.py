"""The endpoint URL fast path (swapping fields of httpx's parsed URL) agrees with the public
``URL.copy_with`` it replaces, for every shape of URL and endpoint the mesh produces."""

from __future__ import annotations

import httpx
import pytest

from meshlib.call import _endpoint_url


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
