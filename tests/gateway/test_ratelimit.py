"""Per-client-IP and per-JWT-subject rate limits at the ingress gateway
(meshlib.gateway.ratelimit): the limiter on a fake clock, then one real-socket test per key kind
through the running gateway (issue 14)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from meshlib.config.model import RateLimitPolicy
from meshlib.gateway.ratelimit import EdgeRateLimits, KeyedLimiter, parse_rate, verified_subject
from tests.gateway.fixtures import EDGE_JWT
from tests.gateway.test_app import running_edge
from tests.inbound.origin.conftest import token
from tests.policy.fakes import FakeClock


def test_parse_rate_reads_rate_and_burst_and_names_what_is_wrong() -> None:
    assert parse_rate("100/s") == RateLimitPolicy(100.0, 100)
    assert parse_rate("20/s:40") == RateLimitPolicy(20.0, 40)
    assert parse_rate("600/m") == RateLimitPolicy(10.0, 10)
    assert parse_rate("1/h") == RateLimitPolicy(1 / 3600, 1)
    assert parse_rate("0.5/s") == RateLimitPolicy(0.5, 1)
    for bad in ("100", "x/s", "10/d", "10/s:", "-1/s", "0/s", "10/s:0"):
        with pytest.raises(ValueError, match=r"rate|burst"):
            parse_rate(bad)


def test_each_key_has_its_own_bucket_refilled_on_the_clock() -> None:
    clock = FakeClock()
    limits = EdgeRateLimits(clock=clock, per_ip="2/s:2")
    assert limits.admit("10.0.0.1", None) is None
    assert limits.admit("10.0.0.1", None) is None
    refused = limits.admit("10.0.0.1", None)
    assert refused is not None and refused.kind == "client-ip" and refused.retry_after == 1
    assert limits.admit("10.0.0.2", None) is None  # a neighbour is not affected
    clock.advance(0.5)  # one token back at 2/s
    assert limits.admit("10.0.0.1", None) is None
    assert limits.admit("10.0.0.1", None) is not None
    assert limits.admit(None, None) is None  # no address known: nothing to key on


def test_subject_limit_applies_to_verified_subjects_only_after_the_ip() -> None:
    clock = FakeClock()
    limits = EdgeRateLimits(clock=clock, per_ip=(100.0, 100), per_subject=(0.1, 1))
    assert limits.admit("10.0.0.1", "iss/alice") is None
    # alice from another address is still alice
    refused = limits.admit("10.0.0.2", "iss/alice")
    assert refused is not None and refused.kind == "subject" and refused.retry_after == 10
    assert limits.admit("10.0.0.2", "iss/bob") is None
    assert limits.admit("10.0.0.2", None) is None  # no verified token: only the IP's bucket


def test_keys_are_bounded_least_recently_used_forgotten() -> None:
    clock = FakeClock()
    limiter = KeyedLimiter(RateLimitPolicy(1.0, 1), max_keys=2)
    assert limiter.take("a", clock())
    assert limiter.take("b", clock())
    assert not limiter.take("a", clock())  # a is now the most recently used
    assert limiter.take("c", clock())  # b forgotten, not a
    assert len(limiter) == 2
    assert not limiter.take("a", clock())
    assert limiter.take("b", clock())  # forgotten: a full bucket again


def test_bad_limits_are_refused_with_their_name() -> None:
    with pytest.raises(ValueError, match="per_subject"):
        EdgeRateLimits(clock=FakeClock(), per_subject=(0.0, 1))
    with pytest.raises(ValueError, match="max_keys"):
        EdgeRateLimits(clock=FakeClock(), per_ip="1/s", max_keys=0)


def test_the_subject_is_only_what_the_middleware_verified() -> None:
    # An unverified token in the headers is never read; only the middleware's extension is.
    scope: dict[str, Any] = {"headers": [(b"authorization", b"Bearer x.y.z")]}
    assert verified_subject(scope) is None
    scope["extensions"] = {"meshlib": {"request_principal": "https://i/alice", "claims": {}}}
    assert verified_subject(scope) == "https://i/alice"
    assert verified_subject({"extensions": {"meshlib": {"request_principal": None}}}) is None


def _get(url: str, source: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=10.0) as client:
        return client.get(url, headers={"host": "shop.example.com", **(headers or {})})


@pytest.mark.timeout(30)
def test_per_client_ip_limit_on_real_sockets() -> None:
    # 127.0.0.1 and 127.0.0.2 are both loopback on Linux: two clients, two buckets.
    with running_edge(rate_limit_per_ip="0.01/s:2") as edge:
        url = edge.server.url + "/"
        assert [_get(url, "127.0.0.1").status_code for _ in range(2)] == [200, 200]
        refused = _get(url, "127.0.0.1")
        assert refused.status_code == 429
        assert refused.headers["x-mesh-reason"] == "rate_limited"
        assert refused.headers["retry-after"] == "100"
        assert "client-ip" in refused.text
        # a forged x-forwarded-for does not buy a fresh bucket (no trusted hops)
        forged = _get(url, "127.0.0.1", {"x-forwarded-for": "10.1.2.3"})
        assert forged.status_code == 429
        assert _get(url, "127.0.0.2").status_code == 200
        assert edge.web.requests == 3


@pytest.mark.timeout(30)
def test_per_subject_limit_on_real_sockets() -> None:
    with running_edge(EDGE_JWT, rate_limit_per_subject="0.01/s:1") as edge:
        url = edge.server.url + "/"
        alice = {"authorization": f"Bearer {token()}"}
        assert _get(url, "127.0.0.1", alice).status_code == 200
        refused = _get(url, "127.0.0.2", alice)  # another address, the same user
        assert refused.status_code == 429
        assert refused.headers["x-mesh-reason"] == "rate_limited"
        assert refused.headers["retry-after"] == "100"
        assert "subject" in refused.text
        bob = {"authorization": f"Bearer {token(sub='bob')}"}
        assert _get(url, "127.0.0.1", bob).status_code == 200
        # a request without a token has no subject: only the IP's limit (none here) applies
        assert _get(url, "127.0.0.1").status_code == 200
        assert _get(url, "127.0.0.1").status_code == 200
        assert edge.web.requests == 4
