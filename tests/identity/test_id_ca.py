"""The built-in CA: certificate shape, key files at rest, and ``meshctl ca``: identity/ca.py."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from idcerts import T0, TD, WEB, at, make_ca

from meshlib.cli import main
from meshlib.identity import (
    CAError,
    CertificateAuthority,
    SpiffeID,
    load_certificates,
    verify_svid,
)


def _ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(cls)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_root_has_the_strict_ca_shape() -> None:
    ca = make_ca()
    cert = ca.certificate
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert cert.subject == cert.issuer
    assert "CN=meshlib root CA" in cert.subject.rfc4514_string()
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    assert _ext(cert, x509.SubjectKeyIdentifier).value.digest
    san = _ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]
    assert cert.not_valid_after_utc - T0 == dt.timedelta(days=3650)
    cert.verify_directly_issued_by(cert)


def test_leaf_has_the_x509_svid_shape() -> None:
    ca = make_ca()
    svid = ca.issue(SpiffeID.parse(WEB), clock=at())
    leaf = svid.certificate
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    bc = _ext(leaf, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = _ext(leaf, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign)
    eku = _ext(leaf, x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = _ext(leaf, x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(WEB)]
    aki = _ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == _ext(ca.certificate, x509.SubjectKeyIdentifier).value.digest
    assert _ext(leaf, x509.SubjectKeyIdentifier).value.digest
    assert leaf.not_valid_before_utc == T0 - dt.timedelta(minutes=1)
    assert leaf.not_valid_after_utc == T0 + dt.timedelta(hours=24)
    assert 0 < leaf.serial_number < 2**127
    assert svid.bundle == (ca.certificate,)
    assert verify_svid(svid.chain, svid.bundle, now=T0) == SpiffeID.parse(WEB)


def test_serials_differ_and_ttl_is_honoured() -> None:
    ca = make_ca()
    sid = SpiffeID.parse(WEB)
    a = ca.issue(sid, clock=at())
    b = ca.issue(sid, ttl=dt.timedelta(minutes=5), clock=at())
    assert a.certificate.serial_number != b.certificate.serial_number
    assert b.certificate.not_valid_after_utc == T0 + dt.timedelta(minutes=5)


@pytest.mark.parametrize(
    ("sid", "ttl", "reason"),
    [
        ("spiffe://other.org/ns/a/sa/b", dt.timedelta(hours=1), "not in this CA's trust domain"),
        (f"spiffe://{TD}", dt.timedelta(hours=1), "has no path"),
        (WEB, dt.timedelta(0), "ttl must be positive"),
    ],
)
def test_issue_refuses(sid: str, ttl: dt.timedelta, reason: str) -> None:
    with pytest.raises(CAError, match=reason):
        make_ca().issue(SpiffeID.parse(sid), ttl=ttl, clock=at())


def test_keys_never_appear_in_reprs() -> None:
    """SEC-14: keys never appear in reprs."""
    ca = make_ca()
    svid = ca.issue(SpiffeID.parse(WEB), clock=at())
    assert "key=" not in repr(ca) and "key=" not in repr(svid)


def test_save_load_round_trip_with_0600_keys_under_umask_000(tmp_path: Path) -> None:
    """SEC-14: fresh key writes are 0600 in a 0700 directory even under umask 000, and no
    temporary (partial) file is left visible."""
    old = os.umask(0)
    try:
        ca = make_ca()
        ca.save(tmp_path / "ca")
        svid = ca.issue(SpiffeID.parse(WEB), clock=at())
        svid.save(tmp_path / "web")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "ca") == 0o700
    assert _mode(tmp_path / "ca" / "ca-key.pem") == 0o600
    assert _mode(tmp_path / "web" / "key.pem") == 0o600
    assert _mode(tmp_path / "ca" / "ca.pem") == 0o644
    assert not [p for p in (tmp_path / "ca").iterdir() if p.name.startswith(".")]  # no temp left
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.trust_domain == TD
    assert loaded.certificate == ca.certificate
    assert loaded.key.private_numbers() == ca.key.private_numbers()
    assert load_certificates(tmp_path / "web" / "cert.pem") == [svid.certificate]
    assert load_certificates(tmp_path / "web" / "bundle.pem") == [ca.certificate]


def test_overwriting_a_0644_key_file_yields_0600(tmp_path: Path) -> None:
    """SEC-14: overwriting an existing 0644 key file results in 0600."""
    out = tmp_path / "web"
    out.mkdir()
    (out / "key.pem").write_text("old")
    (out / "key.pem").chmod(0o644)
    make_ca().issue(SpiffeID.parse(WEB), clock=at()).save(out)
    assert _mode(out / "key.pem") == 0o600
    assert b"PRIVATE KEY" in (out / "key.pem").read_bytes()


def test_init_refuses_to_replace_a_root_key_unless_asked(tmp_path: Path) -> None:
    make_ca().save(tmp_path)
    with pytest.raises(CAError, match="already exists"):
        make_ca().save(tmp_path)
    other = make_ca()
    other.save(tmp_path, overwrite=True)
    assert CertificateAuthority.load(tmp_path).certificate == other.certificate


def test_load_refuses_a_world_readable_key(tmp_path: Path) -> None:
    """SEC-14: a CA key readable by group or others is refused at load."""
    make_ca().save(tmp_path)
    (tmp_path / "ca-key.pem").chmod(0o644)
    with pytest.raises(CAError, match="readable by others"):
        CertificateAuthority.load(tmp_path)


def test_load_reports_missing_and_mismatched_files(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="does not exist"):
        CertificateAuthority.load(tmp_path)
    make_ca().save(tmp_path / "a")
    make_ca().save(tmp_path / "b")
    (tmp_path / "b" / "ca.pem").write_bytes((tmp_path / "a" / "ca.pem").read_bytes())
    with pytest.raises(CAError, match="does not match"):
        CertificateAuthority.load(tmp_path / "b")


# --- meshctl ca --------------------------------------------------------------------------------


def test_cli_init_issue_inspect_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "web"
    assert main(["ca", "init", "--dir", str(ca_dir), "--trust-domain", TD]) == 0
    assert f"spiffe://{TD}" in capsys.readouterr().out
    assert _mode(ca_dir / "ca-key.pem") == 0o600
    args = ["ca", "issue", "--dir", str(ca_dir), "--namespace", "default"]
    assert main([*args, "--service-account", "web", "--out", str(out), "--ttl", "2h"]) == 0
    assert WEB in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"cert.pem", "key.pem", "bundle.pem"}
    assert _mode(out / "key.pem") == 0o600
    leaf = load_certificates(out / "cert.pem")[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=2, minutes=1)
    # the published bundle: the root, with sequence 1 (SEC-7)
    assert (out / "bundle.pem").read_bytes() == (ca_dir / "bundle.pem").read_bytes()
    assert (out / "bundle.pem").read_bytes() == (
        b"# meshlib-bundle-sequence: 1\n" + (ca_dir / "ca.pem").read_bytes()
    )

    bundle = str(out / "bundle.pem")
    assert main(["ca", "inspect", str(out / "cert.pem"), "--bundle", bundle]) == 0
    text = capsys.readouterr().out
    assert f"spiffe id:   {WEB}" in text
    assert "subject:     O=meshlib" in text
    assert "issuer:      CN=meshlib root CA,O=meshlib" in text
    assert "not after:" in text and "not before:" in text
    assert "verified:" in text


def test_cli_inspect_output_json_and_yaml_keys_are_stable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import yaml

    ca_dir, out = tmp_path / "ca", tmp_path / "web"
    assert main(["ca", "init", "--dir", str(ca_dir), "--trust-domain", TD]) == 0
    args = ["--namespace", "default", "--service-account", "web", "--out", str(out)]
    assert main(["ca", "issue", "--dir", str(ca_dir), *args]) == 0
    capsys.readouterr()
    cert, bundle = str(out / "cert.pem"), str(out / "bundle.pem")
    assert main(["ca", "inspect", cert, "--bundle", bundle, "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc) == ["file", "certificates", "verified"]
    [leaf] = doc["certificates"]
    keys = ["subject", "spiffe_id", "issuer", "not_before", "not_after", "serial", "ca"]
    assert list(leaf) == keys
    assert leaf["spiffe_id"] == WEB and leaf["ca"] is False
    assert leaf["issuer"] == "CN=meshlib root CA,O=meshlib"
    assert dt.datetime.fromisoformat(leaf["not_after"]) > dt.datetime.now(dt.timezone.utc)
    assert doc["verified"] == {"spiffe_id": WEB, "bundle": bundle}
    assert main(["ca", "inspect", str(ca_dir / "ca.pem"), "-o", "yaml"]) == 0
    root = yaml.safe_load(capsys.readouterr().out)
    assert root["verified"] is None and root["certificates"][0]["ca"] is True
    assert main(["ca", "inspect", str(tmp_path / "missing.pem"), "-o", "json"]) == 1
    out_text, err = capsys.readouterr()
    assert out_text == "" and err.count("\n") == 1


def test_cli_failures_are_one_line_and_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir = tmp_path / "ca"
    issue = ["ca", "issue", "--dir", str(ca_dir), "--namespace", "a", "--service-account", "b"]
    assert main([*issue, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["ca", "init", "--dir", str(ca_dir), "--trust-domain", "Bad.Org"]) == 1
    assert "lower case" in capsys.readouterr().err
    assert main(["ca", "init", "--dir", str(ca_dir)]) == 0
    assert main(["ca", "init", "--dir", str(ca_dir)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main([*issue, "--out", str(tmp_path / "o"), "--ttl", "soon"]) == 2
    assert capsys.readouterr().err.startswith("meshctl ca issue: --ttl: ")  # the sub-verb named
    assert main([*issue[:-1], "x/y", "--out", str(tmp_path / "o")]) == 1
    assert "not a valid path segment" in capsys.readouterr().err
    assert main(["ca", "inspect", str(tmp_path / "missing.pem")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_cli_inspect_rejects_a_chain_from_another_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a", "b"):
        assert main(["ca", "init", "--dir", str(tmp_path / name)]) == 0
    args = ["--namespace", "n", "--service-account", "s", "--out", str(tmp_path / "w")]
    assert main(["ca", "issue", "--dir", str(tmp_path / "a"), *args]) == 0
    capsys.readouterr()
    cmd = ["ca", "inspect", str(tmp_path / "w" / "cert.pem")]
    assert main([*cmd, "--bundle", str(tmp_path / "b" / "ca.pem")]) == 1
    assert "unknown CA" in capsys.readouterr().err


def test_real_meshctl_console_script(tmp_path: Path) -> None:
    meshctl = Path(sys.executable).with_name("meshctl")
    if not meshctl.exists():
        pytest.skip("meshctl console script is not installed next to this interpreter")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(meshctl), "ca", *args], capture_output=True, text=True, timeout=30, check=False
        )

    assert run("init", "--dir", str(tmp_path / "ca")).returncode == 0
    issued = run(
        "issue", "--dir", str(tmp_path / "ca"), "--namespace", "shop",
        "--service-account", "cart", "--out", str(tmp_path / "cart"),
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    shown = run("inspect", str(tmp_path / "cart" / "cert.pem"))
    assert shown.returncode == 0
    assert "spiffe://cluster.local/ns/shop/sa/cart" in shown.stdout
    failed = run("inspect", str(tmp_path / "nothing.pem"))
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1
