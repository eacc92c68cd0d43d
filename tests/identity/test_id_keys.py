"""SEC-14: private keys at rest and in memory. Keys readable by others are warned about (or
refused on request) when an SVID is loaded; a crash between write and rename leaves the old
key whole and no partial file; key bytes never reach reprs, log lines or exception text."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from meshlib.identity import CertificateAuthority, IdentityError, SpiffeID
from meshlib.identity.tls import SVIDSource, TLSConfigError

TD = "keys.test"
WEB = SpiffeID.for_workload(TD, "default", "web")


@pytest.fixture
def svid_dir(tmp_path: Path) -> Path:
    return CertificateAuthority.create(TD).issue(WEB).save(tmp_path / "web")


def test_a_key_readable_by_others_is_warned_or_refused(
    svid_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = svid_dir / "key.pem"
    with caplog.at_level(logging.WARNING, "meshlib.identity.tls"):
        SVIDSource(svid_dir)
    assert caplog.records == []  # 0600 as written: nothing to say
    key.chmod(0o640)
    with caplog.at_level(logging.WARNING, "meshlib.identity.tls"):
        SVIDSource(svid_dir)
    assert f"{key} is readable by others (mode 0640)" in caplog.text
    with pytest.raises(TLSConfigError, match="readable by others"):
        SVIDSource(svid_dir, strict_key_permissions=True)
    key.chmod(0o600)
    assert SVIDSource(svid_dir, strict_key_permissions=True).spiffe_id == WEB


def test_a_crash_between_write_and_rename_leaves_the_old_key_whole(
    svid_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (svid_dir / "key.pem").read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        CertificateAuthority.create(TD).issue(WEB).save(svid_dir)
    monkeypatch.undo()
    assert (svid_dir / "key.pem").read_bytes() == before
    assert sorted(p.name for p in svid_dir.iterdir()) == ["bundle.pem", "cert.pem", "key.pem"]


def test_key_bytes_never_reach_reprs_logs_or_errors(
    svid_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = SVIDSource(svid_dir)
    key_text = (svid_dir / "key.pem").read_text()
    secret = key_text.splitlines()[1]  # a line of the key's base64 body
    assert "PRIVATE KEY" not in repr(source.material) and secret not in repr(source.material)
    (svid_dir / "key.pem").write_text(key_text.replace(secret, secret[::-1]))
    with caplog.at_level(logging.DEBUG), pytest.raises(IdentityError) as info:
        source.reload()
    shown = f"{info.value} {info.value.reason} {source.last_error} {caplog.text}"
    assert "PRIVATE KEY" not in shown and secret[::-1] not in shown and secret not in shown
