"""Root CA rotation by overlap (SEC-7) without sockets: sequenced bundles, the CA directory's
rotate / drop-old / issued-leaf record, and SVIDSource's sequence rule and pre-flight check.
The same flow under real mTLS traffic is tests/mtls/test_root_rotation.py."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from idcerts import TD

from meshlib.cli import main
from meshlib.identity import CAError, SpiffeID, verify_svid
from meshlib.identity.bundle import BundleError, TrustBundle, load_bundle, root_label
from meshlib.identity.cadir import CADirectory
from meshlib.identity.tls import SVIDSource, TLSConfigError

WEB = SpiffeID.for_workload(TD, "default", "web")
API = SpiffeID.for_workload(TD, "default", "api")


@pytest.fixture
def cadir(tmp_path: Path) -> CADirectory:
    d = CADirectory(tmp_path / "ca")
    d.init(TD)
    return d


# --- bundle files ------------------------------------------------------------------------------


def test_bundle_sequence_round_trips_and_pem_parsers_ignore_the_line(cadir: CADirectory) -> None:
    """SEC-7: the sequence is a comment line; cryptography and OpenSSL skip it."""
    import ssl

    bundle = cadir.bundle()
    assert bundle.sequence == 1 and bundle.roots == (cadir.current().certificate,)
    data = TrustBundle(bundle.roots, 42).to_pem()
    assert data.startswith(b"# meshlib-bundle-sequence: 42\n-----BEGIN CERTIFICATE-----")
    assert TrustBundle.parse(data, "b.pem") == TrustBundle(bundle.roots, 42)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=data.decode())
    assert ctx.cert_store_stats()["x509_ca"] == 1
    # unsequenced: 0
    assert TrustBundle.parse(TrustBundle(bundle.roots).to_pem(), "b.pem").sequence == 0


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"# meshlib-bundle-sequence: -1\n", "is not an integer >= 0"),
        (b"# meshlib-bundle-sequence: two\n", "is not an integer >= 0"),
        (b"# meshlib-bundle-sequence: 1\n# meshlib-bundle-sequence: 2\n", "2 sequence lines"),
    ],
)
def test_bad_sequence_lines_are_refused_naming_the_file(
    cadir: CADirectory, head: bytes, reason: str
) -> None:
    body = TrustBundle(cadir.bundle().roots).to_pem()
    with pytest.raises(BundleError, match=reason) as info:
        TrustBundle.parse(head + body, "svid/bundle.pem")
    assert "svid/bundle.pem" in info.value.reason


# --- the CA directory --------------------------------------------------------------------------


def test_rotate_publishes_both_roots_then_drop_old_only_the_new(
    cadir: CADirectory, tmp_path: Path
) -> None:
    """SEC-7: v1 {R1} seq 1 → v2 {R1, R2} seq 2 → (re-issue) → v3 {R2} seq 3."""
    r1 = cadir.current().certificate
    old_web = cadir.issue(WEB)
    new, v2 = cadir.rotate()
    r2 = new.certificate
    assert r2.subject != r1.subject  # CRLs are matched to roots by name
    assert v2 == TrustBundle((r1, r2), 2) == cadir.bundle()
    prev = cadir.previous()
    assert prev is not None and prev.certificate == r1
    # issue uses the newest root and carries the published bundle
    web = cadir.issue(WEB, out=tmp_path / "web")
    assert web.certificate.issuer == r2.subject
    assert load_bundle(tmp_path / "web" / "bundle.pem") == v2
    assert verify_svid(web.chain, v2.roots) == WEB
    assert verify_svid(old_web.chain, v2.roots) == WEB  # overlap: both roots trusted

    with pytest.raises(CAError, match="a rotation is in progress"):
        cadir.rotate()

    v3 = cadir.export_bundle(tmp_path / "v3.pem", drop_old=True)
    assert v3 == TrustBundle((r2,), 3) == load_bundle(tmp_path / "v3.pem")
    with pytest.raises(CAError, match="nothing to drop"):
        cadir.drop_old()
    # the next rotation may start once the previous root is gone from the bundle
    newer, v4 = cadir.rotate()
    assert v4.roots == (r2, newer.certificate) and v4.sequence == 4


def test_drop_old_refuses_while_a_live_leaf_still_chains_to_the_old_root(
    cadir: CADirectory, tmp_path: Path
) -> None:
    """SEC-7 premature v3, caught at the CA: the issued-leaf record names who is left."""
    cadir.issue(WEB)
    cadir.issue(API)
    cadir.rotate()
    cadir.issue(WEB)  # re-issued under R2; api is not
    r1 = cadir.previous().certificate  # type: ignore[union-attr]
    with pytest.raises(CAError) as info:
        cadir.drop_old()
    reason = info.value.reason
    assert "1 leaf certificate(s) still chained to" in reason
    assert root_label(r1) in reason and str(API) in reason and str(WEB) not in reason
    assert cadir.bundle().sequence == 2  # nothing published
    cadir.issue(API)
    assert cadir.drop_old().sequence == 3


def test_expired_leaves_of_the_old_root_do_not_block_drop_old(tmp_path: Path) -> None:
    now = [dt.datetime.now(dt.timezone.utc)]
    cadir = CADirectory(tmp_path / "ca", clock=lambda: now[0])
    cadir.init(TD)
    cadir.issue(API, ttl=dt.timedelta(hours=1))
    cadir.rotate()
    now[0] += dt.timedelta(hours=2)
    assert cadir.drop_old().roots == (cadir.current().certificate,)


# --- the workload side: sequence rule and pre-flight --------------------------------------------


def test_lower_sequence_is_ignored_equal_or_higher_applied(
    cadir: CADirectory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SEC-7: sequence numbers only increase; a lower one is ignored (logged and counted)."""
    out = tmp_path / "web"
    cadir.issue(WEB, out=out)
    v1 = cadir.bundle()
    source = SVIDSource(out)
    _, v2 = cadir.rotate()
    cadir.export_bundle(out / "bundle.pem")
    assert source.reload() is True and source.bundle_sequence == 2 and len(source.bundle) == 2

    caplog.set_level(logging.WARNING, logger="meshlib.identity")
    (out / "bundle.pem").write_bytes(v1.to_pem())
    assert source.reload() is False
    assert source.bundle == v2.roots and source.bundle_sequence == 2
    assert source.stale_bundles == 1 and source.last_error is None
    assert "sequence 1, lower than the live 2: ignored" in caplog.text
    # an unsequenced bundle counts as 0: also ignored once a sequenced one is live
    (out / "bundle.pem").write_bytes(TrustBundle(v1.roots).to_pem())
    assert source.reload() is False and source.stale_bundles == 2
    # a stale bundle does not hold up a renewed leaf: it is checked against the live roots
    cadir.issue(WEB, out=tmp_path / "renewed")
    for name in ("cert.pem", "key.pem"):
        (out / name).write_bytes((tmp_path / "renewed" / name).read_bytes())
    (out / "bundle.pem").write_bytes(v1.to_pem())
    assert source.reload() is True and source.bundle == v2.roots
    # equal: applied (same content: nothing to do); higher: applied
    (out / "bundle.pem").write_bytes(v2.to_pem())
    assert source.reload() is False
    (out / "bundle.pem").write_bytes(TrustBundle(v2.roots, 7).to_pem())
    assert source.reload() is True and source.bundle_sequence == 7


def test_bundle_dropping_the_workloads_own_root_is_refused_by_the_pre_flight(
    cadir: CADirectory, tmp_path: Path
) -> None:
    """SEC-7 premature v3 at the workload: the leaf is still signed by R1, the new bundle is
    {R2}; refused loudly and the last good context stays."""
    out = tmp_path / "web"
    cadir.issue(WEB, out=out)
    r1 = cadir.current().certificate
    cadir.rotate()
    cadir.export_bundle(out / "bundle.pem")
    source = SVIDSource(out)
    context = source.server_context()
    v3 = cadir.export_bundle(tmp_path / "v3.pem", drop_old=True, force=True)
    (out / "bundle.pem").write_bytes(v3.to_pem())
    with pytest.raises(TLSConfigError) as info:
        source.reload()
    reason = info.value.reason
    assert f"is still chained to {root_label(r1)} which the new bundle drops" in reason
    assert "(sequence 3)" in reason and str(out / "bundle.pem") in reason
    assert source.last_error == reason
    assert source.bundle_sequence == 2 and len(source.bundle) == 2
    assert context.cert_store_stats()["x509_ca"] == 2

    # after the leaf is re-issued under R2, the same v3 is accepted
    cadir.issue(WEB, out=out)
    (out / "bundle.pem").write_bytes(v3.to_pem())
    assert source.reload() is True and source.bundle == v3.roots and source.last_error is None


def test_cli_rotate_bundle_drop_old(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SEC-7: the runbook's commands, exit codes and messages."""
    ca = str(tmp_path / "ca")
    assert main(["ca", "init", "--dir", ca, "--trust-domain", TD]) == 0
    issue = ["ca", "issue", "--dir", ca, "--namespace", "default", "--service-account", "web"]
    assert main([*issue, "--out", str(tmp_path / "web")]) == 0
    assert main(["ca", "rotate", "--dir", ca]) == 0
    out = capsys.readouterr().out
    assert "new root: CN=meshlib root CA " in out and "2 roots, sequence 2" in out
    v3 = str(tmp_path / "v3.pem")
    assert main(["ca", "bundle", "--dir", ca, "--out", v3, "--drop-old"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("meshctl ca bundle: 1 leaf certificate(s) still chained to")
    assert not Path(v3).exists()
    assert main([*issue, "--out", str(tmp_path / "web")]) == 0
    assert main(["ca", "bundle", "--dir", ca, "--out", v3, "--drop-old"]) == 0
    assert f"{v3}: 1 root(s), sequence 3" in capsys.readouterr().out
    assert main(["ca", "bundle", "--dir", ca, "--out", v3, "--force"]) == 2
