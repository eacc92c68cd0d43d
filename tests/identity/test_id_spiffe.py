"""SPIFFE ID parsing and validation (SEC-4's malformed IDs): meshlib/identity/spiffe.py."""

from __future__ import annotations

import dataclasses

import pytest

from meshlib.identity import SpiffeID, SpiffeIDError

VALID = [
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://example.org/ns/default/sa/web", "example.org", "/ns/default/sa/web"),
    ("spiffe://cluster.local/a", "cluster.local", "/a"),
    ("spiffe://td_1-x.y/Mixed.Case-seg_9/..x/.a", "td_1-x.y", "/Mixed.Case-seg_9/..x/.a"),
    ("spiffe://a/" + "x" * 2000, "a", "/" + "x" * 2000),
]


@pytest.mark.parametrize(("text", "td", "path"), VALID)
def test_valid_ids_parse_and_round_trip(text: str, td: str, path: str) -> None:
    sid = SpiffeID.parse(text)
    assert (sid.trust_domain, sid.path) == (td, path)
    assert str(sid) == text
    assert SpiffeID(td, path) == sid


INVALID = [
    ("spiffe://Example.org/x", "lower case"),
    ("spiffe://EXAMPLE.ORG/x", "lower case"),
    ("spiffe://example.org/a//b", "empty segment"),
    ("spiffe://example.org/", "empty segment"),
    ("spiffe://example.org/a/", "trailing"),
    ("spiffe://example.org/a/../b", "'..' segment"),
    ("spiffe://example.org/a/./b", "'.' segment"),
    ("spiffe://example.org:8443/x", "port"),
    ("spiffe://user@example.org/x", "userinfo"),
    ("spiffe://example.org/x?y", "query"),
    ("spiffe://example.org/x#y", "fragment"),
    ("https://example.org/x", "not 'spiffe'"),
    ("SPIFFE://example.org/x", "exactly 'spiffe'"),
    ("spiffe:example.org/x", "does not start with 'spiffe://'"),
    ("example.org/x", "does not start with 'spiffe://'"),
    ("spiffe://example.org/a%2Fb", "percent-encoding"),
    ("spiffe://ex%41mple.org/a", "percent-encoding"),
    ("spiffe://example.org/a b", "character ' '"),
    ("spiffe://exa mple.org/a", "character ' '"),
    ("spiffe:///path", "trust domain is empty"),
    ("spiffe://", "trust domain is empty"),
    ("spiffe://a/" + "x" * 3000, "longer than 2048 bytes"),
    ("spiffe://" + "a" * 256 + "/x", "longer than 255 bytes"),
    ("", "does not start with 'spiffe://'"),
]


@pytest.mark.parametrize(("text", "reason"), INVALID)
def test_invalid_ids_are_rejected_with_a_specific_reason(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIDError) as info:
        SpiffeID.parse(text)
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)


def test_exactly_2048_bytes_is_the_limit() -> None:
    prefix = "spiffe://a/"
    ok = prefix + "x" * (2048 - len(prefix))
    assert str(SpiffeID.parse(ok)) == ok
    with pytest.raises(SpiffeIDError, match="2048"):
        SpiffeID.parse(ok + "x")


def test_for_workload_builds_the_istio_path() -> None:
    sid = SpiffeID.for_workload("cluster.local", "shop", "reviews")
    assert str(sid) == "spiffe://cluster.local/ns/shop/sa/reviews"
    assert not sid.is_trust_domain
    assert SpiffeID.for_trust_domain("cluster.local").is_trust_domain


@pytest.mark.parametrize(
    ("ns", "sa", "reason"),
    [
        ("", "web", "namespace ''"),
        ("a/b", "web", "namespace 'a/b'"),
        ("ns", "..", "service account"),
    ],
)
def test_for_workload_rejects_bad_segments(ns: str, sa: str, reason: str) -> None:
    with pytest.raises(SpiffeIDError, match=reason):
        SpiffeID.for_workload("cluster.local", ns, sa)


def test_constructor_validates_too() -> None:
    with pytest.raises(SpiffeIDError, match="lower case"):
        SpiffeID("Example.org", "/x")
    with pytest.raises(SpiffeIDError, match="must start with '/'"):
        SpiffeID("example.org", "x")


def test_spiffe_id_is_frozen_and_hashable() -> None:
    sid = SpiffeID.parse("spiffe://example.org/x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        sid.path = "/y"  # type: ignore[misc]
    assert {sid, SpiffeID("example.org", "/x")} == {sid}
