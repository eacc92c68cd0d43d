"""SVID verification without a handshake (SEC-1, SEC-2, SEC-4): meshlib/identity/svid.py."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from cryptography import x509
from idcerts import T0, TD, WEB, at, craft_intermediate, craft_leaf, make_ca

from meshlib.identity import CertificateAuthority, SpiffeID, SVIDError, verify_svid
from meshlib.identity.svid import describe_certificate

HOUR = dt.timedelta(hours=1)


def test_a_good_svid_verifies_and_returns_its_id() -> None:
    ca = make_ca()
    leaf = craft_leaf(ca)  # the crafter's defaults are a well-formed SVID
    assert verify_svid([leaf], ca.bundle, now=T0, trust_domain=TD, expected_id=WEB) == (
        SpiffeID.parse(WEB)
    )


def test_unknown_ca_is_rejected() -> None:
    ca, other = make_ca(), make_ca()
    svid = ca.issue(SpiffeID.parse(WEB), clock=at())
    with pytest.raises(SVIDError, match="unknown CA"):
        verify_svid(svid.chain, other.bundle, now=T0)
    # Same subject name, different key: the signature, not the name, decides.
    assert ca.certificate.subject == other.certificate.subject


def test_a_self_signed_leaf_is_an_unknown_ca() -> None:
    ca = make_ca()
    with pytest.raises(SVIDError, match="unknown CA"):
        verify_svid([craft_leaf(ca, self_signed=True)], ca.bundle, now=T0, trust_domain=TD)


def test_a_bundle_of_several_roots_finds_the_right_one() -> None:
    ca = make_ca()
    svid = ca.issue(SpiffeID.parse(WEB), clock=at())
    roots = [make_ca().certificate, ca.certificate, make_ca().certificate]
    assert verify_svid(svid.chain, roots, now=T0) == SpiffeID.parse(WEB)


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        (T0 + 24 * HOUR + dt.timedelta(seconds=1), "leaf certificate has expired"),
        (T0 - 2 * dt.timedelta(minutes=1), "leaf certificate is not yet valid"),
        (T0 + dt.timedelta(days=3651), "expired"),
    ],
)
def test_time_window_is_enforced_at_the_injected_now(now: dt.datetime, reason: str) -> None:
    ca = make_ca()
    svid = ca.issue(SpiffeID.parse(WEB), clock=at())
    with pytest.raises(SVIDError, match=reason):
        verify_svid(svid.chain, ca.bundle, now=now)
    # Inside the window (skew allowance included) the same chain is fine.
    verify_svid(svid.chain, ca.bundle, now=T0 - dt.timedelta(seconds=59))
    verify_svid(svid.chain, ca.bundle, now=T0 + 24 * HOUR)


def test_an_expired_root_is_named() -> None:
    ca = make_ca()
    leaf = craft_leaf(ca, not_after=T0 + dt.timedelta(days=4000))
    with pytest.raises(SVIDError, match="root certificate has expired"):
        verify_svid([leaf], ca.bundle, now=T0 + dt.timedelta(days=3651))


def test_wrong_trust_domain_is_rejected() -> None:
    ca = make_ca("other.org")
    svid = ca.issue(SpiffeID.for_workload("other.org", "default", "web"), clock=at())
    with pytest.raises(
        SVIDError, match=re.escape("trust domain 'other.org', expected 'example.org'")
    ):
        verify_svid(svid.chain, ca.bundle, now=T0, trust_domain=TD)


def test_wrong_workload_for_the_expected_service_is_rejected() -> None:
    ca = make_ca()
    svid = ca.issue(SpiffeID.for_workload(TD, "default", "attacker"), clock=at())
    with pytest.raises(SVIDError, match=re.escape(f"is not the expected {WEB}")):
        verify_svid(svid.chain, ca.bundle, now=T0, trust_domain=TD, expected_id=WEB)
    # The trust domain alone would have accepted it: the ID check is what catches it.
    verify_svid(svid.chain, ca.bundle, now=T0, trust_domain=TD)


def test_a_ca_certificate_presented_as_a_leaf_is_rejected() -> None:
    ca = make_ca()
    with pytest.raises(SVIDError, match="leaf is a CA certificate"):
        verify_svid([ca.certificate], ca.bundle, now=T0)


MALFORMED = [
    ({"uris": (WEB, f"spiffe://{TD}/ns/default/sa/other")}, "2 URI SANs"),
    ({"uris": ()}, "no URI SAN"),
    ({"basic_ca": True}, "leaf is a CA certificate"),
    ({"basic_ca": None}, "no basicConstraints"),
    ({"key_cert_sign": True}, "keyCertSign"),
    ({"key_usage": False}, "no keyUsage"),
    ({"key_usage_critical": False}, "not marked critical"),
    ({"digital_signature": False}, "lacks digitalSignature"),
    ({"uris": ("https://example.org/x",)}, "not 'spiffe'"),
    ({"uris": ("spiffe://EXAMPLE.org/x",)}, "lower case"),
    ({"uris": ("spiffe://example.org:8443/x",)}, "port"),
    ({"uris": ("spiffe://user@example.org/x",)}, "userinfo"),
    ({"uris": ("spiffe://example.org/x?y",)}, "query"),
    ({"uris": ("spiffe://example.org/a/../b",)}, "'..' segment"),
    ({"uris": ("spiffe://example.org/",)}, "empty segment"),
    ({"uris": ("spiffe://example.org",)}, "has no path"),
    ({"uris": ("spiffe://example.org/a//b",)}, "empty segment"),
    ({"uris": ("spiffe://example.org/a%2Fb",)}, "percent-encoding"),
    ({"uris": ("spiffe://example.org/" + "x" * 3000,)}, "longer than 2048"),
]


@pytest.mark.parametrize(("bend", "reason"), MALFORMED)
def test_malformed_svids_signed_by_the_trusted_ca_are_rejected(
    bend: dict[str, object], reason: str
) -> None:
    ca = make_ca()
    leaf = craft_leaf(ca, **bend)  # type: ignore[arg-type]
    with pytest.raises(SVIDError) as info:
        verify_svid([leaf], ca.bundle, now=T0)
    assert reason in info.value.reason


def test_empty_inputs_are_rejected() -> None:
    ca = make_ca()
    with pytest.raises(SVIDError, match="no certificate"):
        verify_svid([], ca.bundle, now=T0)
    with pytest.raises(SVIDError, match="bundle is empty"):
        verify_svid([craft_leaf(ca)], [], now=T0)


def test_describe_certificate_lists_what_inspect_prints() -> None:
    ca = make_ca()
    lines = dict(describe_certificate(craft_leaf(ca)))
    assert lines["spiffe id"] == WEB
    assert lines["issuer"] == "CN=meshlib root CA,O=meshlib"
    assert lines["ca"] == "no"
    bad = dict(describe_certificate(craft_leaf(ca, uris=("https://x",))))
    assert bad["spiffe id"].startswith("(invalid:")
    assert dict(describe_certificate(craft_leaf(ca, uris=())))["spiffe id"] == "(none)"
    assert isinstance(ca.certificate, x509.Certificate)


def test_intermediates_are_followed_and_path_length_is_enforced() -> None:
    root = make_ca()  # pathlen 0: no intermediate allowed below it
    inter = craft_intermediate(root)
    svid = inter.issue(SpiffeID.parse(WEB), clock=at())
    chain = [svid.certificate, inter.certificate]
    with pytest.raises(SVIDError, match="allows 0 intermediate"):
        verify_svid(chain, root.bundle, now=T0)
    # With the intermediate itself trusted as a root, the path is leaf -> intermediate.
    assert verify_svid(chain, inter.bundle, now=T0) == SpiffeID.parse(WEB)
    # Without the intermediate in the chain, the root alone does not vouch for the leaf.
    with pytest.raises(SVIDError, match="unknown CA"):
        verify_svid([svid.certificate], root.bundle, now=T0)
    # A leaf that claims the intermediate as issuer but is signed by another key is refused.
    forged = craft_leaf(CertificateAuthority(TD, inter.certificate, make_ca().key))
    with pytest.raises(SVIDError, match="unknown CA"):
        verify_svid([forged, inter.certificate], inter.bundle, now=T0)
