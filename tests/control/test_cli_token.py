"""``meshctl token create|list|revoke`` against a real registry (uvicorn, strict mTLS, SQLite),
driven in-process through ``main``."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshlib.cli.main import main
from meshlib.control.tokens import parse_token
from meshlib.identity.bundle import load_bundle
from meshlib.identity.cadir import CADirectory
from tests.control.conftest import TD, RunningRegistry

pytestmark = pytest.mark.timeout(30)

WORKLOAD = f"spiffe://{TD}/ns/default/sa/reviews"

Run = tuple[int, str, str]


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHLIB_REGISTRY", raising=False)
    monkeypatch.delenv("MESHLIB_SVID_DIR", raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    code = main(list(argv))
    found = capsys.readouterr()
    return code, found.out, found.err


def at(registry: RunningRegistry, svid: Path | None = None) -> tuple[str, ...]:
    return ("--registry", registry.url, "--svid-dir", str(svid or registry.admin_svid))


def spki_sha256(cert: x509.Certificate) -> str:
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def test_create_list_revoke(registry: RunningRegistry, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "token", "create", "--spiffe-id", WORKLOAD, *at(registry))
    assert code == 0, err
    token = out.strip()
    id, _ = parse_token(token)  # stdout is the token alone: TOKEN=$(meshctl token create ...)
    assert out == token + "\n"
    assert err.startswith(f"token {id} for {WORKLOAD}, valid once until 20")
    assert "shown this once" in err

    code, out, err = run(capsys, "token", "list", *at(registry))
    assert code == 0, err
    head, row = out.splitlines()
    assert head.split() == ["ID", "SPIFFE_ID", "STATE", "EXPIRES", "USED", "REVOKED"]
    assert row.split()[:3] == [id, WORKLOAD, "unused"] and row.split()[4:] == ["-", "-"]

    code, out, err = run(capsys, "token", "revoke", id, *at(registry))
    assert (code, err) == (0, "")
    assert out.startswith(f"revoked token {id} at 20") and out.endswith("Z\n")
    code, out, _ = run(capsys, "token", "list", "-o", "json", *at(registry))
    [listed] = json.loads(out)["tokens"]
    assert (listed["id"], listed["state"]) == (id, "revoked")
    assert "secret_sha256" not in listed

    assert run(capsys, "token", "revoke", "ffffffffffff", *at(registry)) == (
        1,
        "",
        "meshctl token revoke: no join token ffffffffffff in the registry "
        "(meshctl token list shows them)\n",
    )
    code, _, err = run(capsys, "token", "revoke", "nope", *at(registry))
    assert code == 2 and "a token id is 12 lower-case hex characters, got 'nope'" in err


def test_create_json_yaml_and_ttl(
    registry: RunningRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys,
        "token",
        "create",
        "--spiffe-id",
        WORKLOAD,
        "--ttl",
        "2h",
        "-o",
        "json",
        *at(registry),
    )
    assert code == 0, err
    made = json.loads(out)
    assert set(made) == {"token", "id", "spiffe_id", "expires_at", "expires"}
    code, out, _ = run(capsys, "token", "list", "-o", "yaml", *at(registry))
    [listed] = yaml.safe_load(out)["tokens"]
    assert listed["expires_at"] - listed["created_at"] == 7200

    code, _, err = run(
        capsys, "token", "create", "--spiffe-id", WORKLOAD, "--ttl", "soon", *at(registry)
    )
    assert code == 2 and "'soon' is not a duration like 90s, 15m or 2h" in err
    code, _, err = run(
        capsys, "token", "create", "--spiffe-id", WORKLOAD, "--ttl", "25h", *at(registry)
    )
    assert code == 1
    assert err == (
        f"meshctl token create: registry {registry.url}: 400: ttl must be 60..86400 seconds "
        "(1 min..24 h), got 90000\n"
    )
    other = "spiffe://other.test/ns/default/sa/reviews"
    code, _, err = run(capsys, "token", "create", "--spiffe-id", other, *at(registry))
    assert code == 1 and "of trust domain 'other.test'" in err


def test_a_workload_svid_is_refused(
    registry: RunningRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    workload = registry.issue("default", "reviews")
    for argv in (("create", "--spiffe-id", WORKLOAD), ("list",), ("revoke", "ffffffffffff")):
        code, out, err = run(capsys, "token", *argv, *at(registry, workload))
        assert (code, out) == (1, ""), argv
        assert err.startswith(
            f"meshctl token {argv[0]}: registry {registry.url} refused: {WORKLOAD}"
        )
        assert "is not an admin of the registry" in err


def test_join_string_pins_the_root(
    registry: RunningRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "token", "create", "--spiffe-id", WORKLOAD, "--join", *at(registry)
    )
    assert code == 0, err
    [root] = load_bundle(registry.admin_svid / "bundle.pem").roots
    prefix = f"meshlib-join:v1:{registry.url}:{spki_sha256(root)}:"
    line = out.strip()
    assert line.startswith(prefix)
    parse_token(line.removeprefix(prefix))
    assert "note:" not in err  # one root: nothing to say


def test_join_string_pins_the_newest_of_several_roots(
    registry: RunningRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # an hour on: the new root's notBefore is later than the first's, whatever the machine's speed
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    CADirectory(registry.data / "ca", clock=lambda: later).rotate()
    svid = tmp_path / "admin"
    shutil.copytree(registry.admin_svid, svid)
    shutil.copy(registry.data / "ca" / "bundle.pem", svid / "bundle.pem")
    roots = load_bundle(svid / "bundle.pem").roots
    assert len(roots) == 2
    newest = max(roots, key=lambda c: c.not_valid_before_utc)
    assert spki_sha256(newest) != spki_sha256(roots[0])  # the first root would be the wrong pin
    code, out, err = run(
        capsys, "token", "create", "--spiffe-id", WORKLOAD, "--join", *at(registry, svid)
    )
    assert code == 0, err
    assert out.startswith(f"meshlib-join:v1:{registry.url}:{spki_sha256(newest)}:")
    assert "note: the bundle holds 2 roots; the join string pins the newest" in err


def test_join_without_a_bundle_costs_no_token(
    registry: RunningRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    svid = tmp_path / "admin"
    shutil.copytree(registry.admin_svid, svid)
    (svid / "bundle.pem").unlink()
    code, out, err = run(
        capsys, "token", "create", "--spiffe-id", WORKLOAD, "--join", *at(registry, svid)
    )
    assert (code, out) == (1, "")
    assert "--join needs the trust bundle: cannot read" in err
    assert registry.client().tokens() == ()
