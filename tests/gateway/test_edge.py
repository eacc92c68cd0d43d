"""Edge hygiene of the ingress gateway, pure (no sockets): headers only the mesh may set are
dropped from outside, forwarding headers are appended or replaced as Envoy's edge mode does,
request limits answer 414/431/413 and ambiguous framing 400 (issue 14)."""

from __future__ import annotations

import pytest

from meshlib.config.model import FaultRule, PolicyTarget
from meshlib.context import DEADLINE_HEADER
from meshlib.errors import REASON_HEADER, Reason
from meshlib.gateway.edge import (
    DEFAULT_LIMITS,
    Downstream,
    EdgeLimits,
    Refusal,
    body_refusal,
    check_request,
    client_address,
    edge_headers,
    fault_header_names,
    forwarded_element,
    head_refusal,
    mesh_only_header,
)
from meshlib.inbound.peer import IDENTITY_HEADER

OUTSIDE = Downstream("203.0.113.7", "https", "shop.example.com")


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs]


def names(headers: list[tuple[bytes, bytes]]) -> list[str]:
    return [n.decode().lower() for n, _ in headers]


def value(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    found = [v.decode() for n, v in headers if n.decode().lower() == name]
    assert len(found) <= 1, f"{name} appears {len(found)} times"
    return found[0] if found else None


# --- headers only the mesh may set --------------------------------------------------------------

FORGED = [
    IDENTITY_HEADER,  # x-mesh-identity
    DEADLINE_HEADER,  # x-mesh-timeout-ms
    REASON_HEADER,  # x-mesh-reason
    "x-forwarded-client-cert",
    "X-Mesh-Peer",
    "x-spiffe-id",
    "x-meshlib-anything",
    "x-mesh-whatever",
    "l5d-dst-override",
    "x-envoy-upstream-rq-timeout-ms",
    "x_mesh_identity",  # an underscore spelling
    "X_Forwarded_Client_Cert",
]


@pytest.mark.parametrize("name", FORGED)
def test_forged_mesh_headers_from_outside_are_dropped(name: str) -> None:
    assert mesh_only_header(name)
    out = edge_headers(h((name, "spiffe://evil/ns/x/sa/admin"), ("accept", "*/*")), OUTSIDE)
    assert name.lower() not in names(out)
    assert value(out, "accept") == "*/*"


def test_ordinary_headers_pass_in_order() -> None:
    incoming = h(("Accept", "a"), ("Authorization", "Bearer t"), ("X-Custom", "1"), ("cookie", "c"))
    out = edge_headers(incoming, OUTSIDE)
    assert out[:4] == incoming
    assert not mesh_only_header("authorization")


def test_fault_rule_headers_are_mesh_only_when_given() -> None:
    rule = FaultRule(
        "f", "default", PolicyTarget(service="reviews.default"), headers={"end-user": "jason"}
    )
    extra = fault_header_names([rule])
    assert extra == frozenset({"end-user"})
    assert mesh_only_header("End-User", extra) and not mesh_only_header("End-User")
    out = edge_headers(h(("End-User", "jason")), OUTSIDE, also_strip=extra)
    assert "end-user" not in names(out)
    assert value(edge_headers(h(("End-User", "jason")), OUTSIDE), "end-user") == "jason"


def test_trace_context_from_outside_is_dropped_unless_trusted() -> None:
    incoming = h(("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"), ("baggage", "a=b"))
    assert "traceparent" not in names(edge_headers(incoming, OUTSIDE))
    kept = edge_headers(incoming, OUTSIDE, trust_trace_context=True)
    assert value(kept, "traceparent") is not None and value(kept, "baggage") == "a=b"


def test_hop_by_hop_headers_and_those_named_by_connection_are_dropped() -> None:
    incoming = h(
        ("Connection", "keep-alive, X-Secret, host"),
        ("Keep-Alive", "timeout=5"),
        ("X-Secret", "1"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Upgrade", "websocket"),
        ("Host", "shop.example.com"),
    )
    out = edge_headers(incoming, OUTSIDE)
    assert names(out)[0] == "host"  # Connection cannot nominate an end-to-end header
    for gone in ("connection", "keep-alive", "x-secret", "transfer-encoding", "te", "upgrade"):
        assert gone not in names(out)
    ws = edge_headers(
        h(("Connection", "Upgrade"), ("Upgrade", "websocket")), OUTSIDE, keep_upgrade=True
    )
    assert value(ws, "upgrade") == "websocket" and value(ws, "connection") == "upgrade"


# --- forwarding ----------------------------------------------------------------------------------


def test_x_forwarded_for_is_appended_and_proto_host_are_replaced() -> None:
    incoming = h(
        ("X-Forwarded-For", "198.51.100.1, 10.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Real-IP", "127.0.0.1"),
        ("X-Forwarded-Port", "1"),
    )
    out = edge_headers(incoming, OUTSIDE)
    assert value(out, "x-forwarded-for") == "198.51.100.1, 10.0.0.1, 203.0.113.7"
    assert value(out, "x-forwarded-proto") == "https"
    assert value(out, "x-forwarded-host") == "shop.example.com"
    assert "x-real-ip" not in names(out) and "x-forwarded-port" not in names(out)
    fresh = edge_headers([], Downstream("198.51.100.9", "http", "a.example"))
    assert value(fresh, "x-forwarded-for") == "198.51.100.9"
    assert value(fresh, "x-forwarded-proto") == "http"


def test_behind_trusted_proxies_their_proto_and_host_are_kept() -> None:
    incoming = h(
        ("X-Forwarded-For", "198.51.100.1"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "front.example"),
    )
    out = edge_headers(incoming, Downstream("10.0.0.2", "http", "gw.internal"), trusted_hops=1)
    assert value(out, "x-forwarded-proto") == "https"
    assert value(out, "x-forwarded-host") == "front.example"
    assert value(out, "x-forwarded-for") == "198.51.100.1, 10.0.0.2"


def test_client_address_counts_trusted_hops_from_the_right() -> None:
    xff = h(("x-forwarded-for", "1.1.1.1, 2.2.2.2"), ("X-Forwarded-For", "3.3.3.3"))
    assert client_address(xff, "9.9.9.9") == "9.9.9.9"  # no trusted hops: the peer
    assert client_address(xff, "9.9.9.9", trusted_hops=1) == "3.3.3.3"
    assert client_address(xff, "9.9.9.9", trusted_hops=3) == "1.1.1.1"
    assert client_address(xff, "9.9.9.9", trusted_hops=10) == "1.1.1.1"
    assert client_address([], None, trusted_hops=1) is None


def test_forwarded_elements_follow_rfc_7239() -> None:
    assert forwarded_element(OUTSIDE) == "for=203.0.113.7;host=shop.example.com;proto=https"
    v6 = Downstream("2001:db8::1", "http", "shop.example.com:8080")
    assert forwarded_element(v6) == 'for="[2001:db8::1]";host="shop.example.com:8080";proto=http'
    assert forwarded_element(Downstream(None, "http", None)) == "for=unknown;proto=http"
    odd = Downstream("unix:/tmp/sock", "http", 'a"b')
    assert forwarded_element(odd) == 'for="unix:/tmp/sock";host="a\\"b";proto=http'


def test_forwarded_is_appended_to_a_valid_chain_and_replaces_a_broken_one() -> None:
    valid = edge_headers(
        h(("Forwarded", 'for=192.0.2.60;proto=http, for="[2001:db8::2]"')), OUTSIDE
    )
    assert value(valid, "forwarded") == (
        'for=192.0.2.60;proto=http, for="[2001:db8::2]", '
        "for=203.0.113.7;host=shop.example.com;proto=https"
    )
    broken = edge_headers(h(("Forwarded", 'for="unterminated')), OUTSIDE)
    assert value(broken, "forwarded") == "for=203.0.113.7;host=shop.example.com;proto=https"


# --- limits --------------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    assert EdgeLimits(60 * 1024, 100, 8 * 1024, 16 * 1024 * 1024) == DEFAULT_LIMITS
    assert check_request(b"/", b"", h(("host", "a"))) is None


def test_url_length_limit_gives_414() -> None:
    limits = EdgeLimits(max_url_length=20)
    assert check_request(b"/" + b"a" * 19, b"", [], limits=limits) is None
    refusal = check_request(b"/" + b"a" * 10, b"q=" + b"b" * 8, [], limits=limits)
    assert refusal is not None and refusal.status == 414 and "22 bytes" in refusal.detail
    assert refusal.reason is Reason.BAD_REQUEST


def test_header_count_and_bytes_limits_give_431() -> None:
    limits = EdgeLimits(max_header_count=3, max_header_bytes=40)
    three = h(("a", "1"), ("b", "2"), ("c", "3"))
    assert check_request(b"/", b"", three, limits=limits) is None
    four = check_request(b"/", b"", [*three, (b"d", b"4")], limits=limits)
    assert four == Refusal(431, "4 header fields, at most 3 are allowed")
    # one field of name 6 + value 30 + 4 = 40 bytes fits; one byte more does not
    assert check_request(b"/", b"", h(("x-long", "v" * 30)), limits=limits) is None
    big = check_request(b"/", b"", h(("x-long", "v" * 31)), limits=limits)
    assert big is not None and big.status == 431 and "41 bytes" in big.detail
    assert "v" * 31 not in big.detail  # values are never echoed


def test_declared_body_size_limit_gives_413() -> None:
    limits = EdgeLimits(max_body_bytes=1000)
    assert check_request(b"/", b"", h(("content-length", "1000")), limits=limits) is None
    refusal = check_request(b"/", b"", h(("content-length", "1001")), limits=limits)
    assert refusal is not None and refusal.status == 413
    assert body_refusal(1000, limits) is None
    streamed = body_refusal(1001, limits)
    assert streamed is not None and streamed.status == 413


def test_limits_can_be_disabled() -> None:
    off = EdgeLimits(None, None, None, None)
    many = [(b"x-%d" % i, b"v" * 1000) for i in range(500)]
    assert (
        check_request(b"/" * 100_000, b"", [*many, (b"content-length", b"9" * 15)], limits=off)
        is None
    )


# --- framing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], "both"),
        ([("Transfer-Encoding", "chunked"), ("Content-Length", "0")], "both"),
        ([("Content-Length", "5"), ("Content-Length", "6")], "different"),
        ([("Content-Length", "5, 6")], "different"),
        ([("Transfer-Encoding", "gzip, chunked")], "chunked"),
        ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")], "chunked"),
        ([("Transfer-Encoding", "chunked, ")], "chunked"),
        ([("Transfer-Encoding", "identity")], "chunked"),
        ([("Transfer-Encoding", "xchunked")], "chunked"),
        ([("Content-Length", "-1")], "decimal"),
        ([("Content-Length", "+5")], "decimal"),
        ([("Content-Length", "0x10")], "decimal"),
        ([("Content-Length", "")], "decimal"),
        ([("Content-Length", "9" * 20)], "decimal"),
    ],
)
def test_ambiguous_framing_gives_400(headers: list[tuple[str, str]], why: str) -> None:
    refusal = check_request(b"/", b"", h(*headers))
    assert refusal is not None and refusal.status == 400 and why in refusal.detail


def test_unambiguous_framing_passes() -> None:
    assert check_request(b"/", b"", h(("Transfer-Encoding", "Chunked"))) is None
    assert check_request(b"/", b"", h(("Content-Length", "5"), ("content-length", "5"))) is None
    assert check_request(b"/", b"", h(("Content-Length", "5, 5"))) is None
    old = check_request(b"/", b"", h(("Transfer-Encoding", "chunked")), http_version="1.0")
    assert old is not None and old.status == 400 and "HTTP/1.0" in old.detail


def test_head_refusal_reads_line_endings_and_folding_of_the_head_only() -> None:
    good = b"GET / HTTP/1.1\r\nHost: a\r\nX: b c\r\n\r\n"
    assert head_refusal(good) is None
    assert head_refusal(good[:20]) is None  # incomplete: as far as it goes
    assert head_refusal(b"GET / HTTP/1.1\r") is None  # its LF may come next
    # the body after the blank line is not the head's business
    assert head_refusal(good + b"raw\nbody\r \n\tx") is None
    for bad in (
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
    ):
        refusal = head_refusal(bad)
        assert refusal is not None and refusal.status == 400
        assert "CRLF" in refusal.detail
    for folded in (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", b"GET / HTTP/1.1\r\n\tX: a\r\n"):
        refusal = head_refusal(folded)
        assert refusal is not None and "folding" in refusal.detail
