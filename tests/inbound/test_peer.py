"""The pure trust decisions: who the peer is, which headers survive, what deadline it sent."""

from __future__ import annotations

import pytest

from inbound.conftest import http_scope, tls_extension
from meshlib.inbound import (
    IDENTITY_HEADER,
    MAX_PROPAGATED_TIMEOUT,
    propagated_timeout,
    sanitize_headers,
    spiffe_trust_domain,
    verified_identity,
)

TD = "shop.test"
REVIEWS = "spiffe://shop.test/ns/default/sa/reviews"


def test_a_spiffe_certificate_in_the_trust_domain_is_a_member() -> None:
    scope = http_scope(extensions=tls_extension(REVIEWS))
    assert verified_identity(scope, TD) == REVIEWS


@pytest.mark.parametrize(
    ("uris", "error"),
    [
        (("spiffe://other.test/ns/default/sa/reviews",), None),  # another trust domain
        ((REVIEWS, "spiffe://shop.test/ns/default/sa/ratings"), None),  # two URI SANs
        ((), None),  # no SAN at all
        (("https://shop.test/ns/default/sa/reviews",), None),  # not SPIFFE
        (("spiffe://shop.test",), None),  # no workload path
        (("spiffe://SHOP.test/ns/x",), None),  # trust domains are lower case
        (("spiffe://shop.test/ns/../sa/x",), None),  # dot segments
        (("spiffe://shop.test:443/ns/x",), None),  # a port is not a trust domain
        ((REVIEWS,), "certificate verify failed"),  # the TLS layer rejected it
    ],
)
def test_anything_else_is_not_a_member(uris: tuple[str, ...], error: str | None) -> None:
    scope = http_scope(extensions=tls_extension(*uris, error=error))
    assert verified_identity(scope, TD) is None


def test_plain_http_and_odd_extensions_are_not_members() -> None:
    assert verified_identity(http_scope(), TD) is None
    assert verified_identity(http_scope(extensions={}), TD) is None
    assert verified_identity(http_scope(extensions={"tls": {"client_cert_chain": []}}), TD) is None
    garbage = {"tls": {"client_cert_chain": ["not a pem"], "client_cert_error": None}}
    assert verified_identity(http_scope(extensions=garbage), TD) is None


def test_spiffe_trust_domain_parses_well_formed_ids_only() -> None:
    assert spiffe_trust_domain(REVIEWS) == TD
    assert spiffe_trust_domain("spiffe://shop.test/a?b=c") is None
    assert spiffe_trust_domain("spiffe://shop.test/a#f") is None
    assert spiffe_trust_domain("spiffe://u@shop.test/a") is None
    assert spiffe_trust_domain("spiffe://shop.test//a") is None


FORGED = [
    (b"x-forwarded-client-cert", b"By=spiffe://shop.test/ns/default/sa/admin"),
    (b"x-spiffe-id", b"spiffe://shop.test/ns/default/sa/admin"),
    (b"x-mesh-identity", b"spiffe://shop.test/ns/default/sa/admin"),
    (b"x-mesh-peer", b"admin"),
    (b"x-meshlib-principal", b"admin"),
    (b"l5d-client-id", b"admin.default.serviceaccount.identity.linkerd.cluster.local"),
    (b"X_Forwarded_Client_Cert", b"By=spiffe://x"),
    (b"x_spiffe_id", b"spiffe://x"),
]
CONTROL = [
    (b"x-mesh-timeout-ms", b"99999"),
    (b"x-mesh-reason", b"ok"),
    (b"x-envoy-fault-abort-request", b"503"),
    (b"l5d-dst-override", b"admin:80"),
]
PLAIN = [(b"host", b"productpage"), (b"x-request-id", b"r1"), (b"x_custom", b"kept")]


def test_untrusted_peers_lose_identity_and_control_headers() -> None:
    assert sanitize_headers(FORGED + CONTROL + PLAIN, None) == PLAIN


def test_members_keep_control_headers_but_identity_is_re_derived() -> None:
    out = sanitize_headers(FORGED + CONTROL + PLAIN + [(b"x_mesh_timeout_ms", b"1")], REVIEWS)
    # underscore spellings of controlled names are dropped even from members
    assert out == CONTROL + PLAIN + [(IDENTITY_HEADER.encode(), REVIEWS.encode())]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"250"], 0.25),
        ([b" 250 "], 0.25),
        ([b"0"], 0.0),
        ([b"900", b"300"], 0.3),  # repeated: the shortest wins
        ([b"99999999999"], MAX_PROPAGATED_TIMEOUT),
        ([b"-5"], None),
        ([b"1.5"], None),
        ([b"abc"], None),
        ([b"9" * 40], None),
        ([], None),
    ],
)
def test_propagated_timeout(values: list[bytes], expected: float | None) -> None:
    headers = [(b"X-Mesh-Timeout-Ms", v) for v in values] + [(b"host", b"x")]
    assert propagated_timeout(headers) == expected
