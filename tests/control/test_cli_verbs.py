"""``meshctl apply|get|history|rollback|registry status`` against a real registry (uvicorn,
strict mTLS, SQLite): driven in-process through ``main``, plus ``apply -f -`` as a process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshlib.cli.main import main
from meshlib.cli.registry_client import joined_policy
from meshlib.config.loader import load_text
from meshlib.errors import ConfigError, Problem
from tests.control.conftest import TD, RunningRegistry

pytestmark = pytest.mark.timeout(30)

ADMIN = f"spiffe://{TD}/ns/meshlib-system/sa/meshctl"
MESH = f"""apiVersion: meshlib/v1
kind: Mesh
metadata: {{name: shop}}
spec: {{trustDomain: {TD}, mtls: strict}}
"""
REVIEWS = """---
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews}
spec:
  serviceAccount: reviews
"""
#: Line 5 of the file is the problem.
BAD = """apiVersion: meshlib/v1
kind: Service
metadata: {name: ratings}
spec:
  timeout: banana
"""

Run = tuple[int, str, str]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    made = {}
    for name, text in (("mesh.yaml", MESH), ("reviews.yaml", REVIEWS), ("bad.yaml", BAD)):
        made[name] = tmp_path / name
        made[name].write_text(text, encoding="utf-8")
    return made


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


def test_apply_get_policy_history_and_rollback(
    registry: RunningRegistry, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    mesh, reviews = str(files["mesh.yaml"]), str(files["reviews.yaml"])
    assert run(capsys, "apply", "-f", mesh, "-f", reviews, *at(registry)) == (
        0,
        "applied version 1\n",
        "",
    )
    sent = registry.client().policy()
    assert json.loads(
        run(capsys, "apply", "-f", mesh, reviews, "-o", "json", *at(registry))[1]
    ) == {
        "version": 1,
        "digest": sent.digest,
        "changed": False,
    }
    assert sent.text == MESH + "---\n" + REVIEWS  # one text: the files joined by a --- line
    load_text(sent.text)  # and it loads
    assert run(capsys, "apply", "-f", mesh, reviews, *at(registry))[1] == "unchanged: version 1\n"

    code, out, _ = run(capsys, "get", "policy", *at(registry))
    header, text = out.split("\n", 1)
    assert code == 0 and text == sent.text
    assert header.startswith(f"# version 1 ({sent.digest}), applied by {ADMIN} at 20")
    got = json.loads(run(capsys, "get", "policy", "-o", "json", *at(registry))[1])
    assert (got["version"], got["digest"], got["author"], got["text"]) == (
        1,
        sent.digest,
        ADMIN,
        sent.text,
    )
    assert got["created"].endswith("Z") and got["rollback_of"] is None
    assert yaml.safe_load(run(capsys, "get", "policy", "-o", "yaml", *at(registry))[1]) == got

    files["mesh.yaml"].write_text(MESH.replace("strict", "permissive"), encoding="utf-8")
    assert run(capsys, "apply", "-f", mesh, *at(registry))[1] == "applied version 2\n"
    code, out, _ = run(capsys, "rollback", "1", *at(registry))
    assert (code, out) == (0, "applied version 3 (rollback of version 1)\n")
    assert registry.client().policy().text == sent.text
    code, out, _ = run(capsys, "rollback", "1", "-o", "json", *at(registry))
    assert json.loads(out) == {
        "version": 3,
        "rollback_of": 1,
        "digest": sent.digest,
        "changed": False,
    }
    assert run(capsys, "rollback", "1", *at(registry))[1] == (
        "unchanged: version 3 already has the text of version 1\n"
    )
    assert yaml.safe_load(run(capsys, "rollback", "1", "-o", "yaml", *at(registry))[1]) == (
        json.loads(out)
    )
    code, _, err = run(capsys, "rollback", "9", *at(registry))
    assert (code, err) == (
        1,
        "meshctl rollback: no version 9 in the registry (meshctl history lists them)\n",
    )

    code, out, _ = run(capsys, "history", *at(registry))
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == [
        "VERSION",
        "DIGEST",
        "AUTHOR",
        "CREATED",
        "ROLLBACK_OF",
    ]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]
    assert lines[1].split()[1] == sent.digest.removeprefix("sha256:")[:12]
    assert lines[1].split()[2] == ADMIN and lines[3].split()[-1] == "1"
    versions = json.loads(run(capsys, "history", "-o", "json", *at(registry))[1])["versions"]
    assert [(v["version"], v["rollback_of"]) for v in versions] == [(1, None), (2, None), (3, 1)]
    assert set(versions[0]) == {
        "version",
        "digest",
        "author",
        "created_at",
        "created",
        "rollback_of",
    }
    assert yaml.safe_load(run(capsys, "history", "-o", "yaml", *at(registry))[1]) == {
        "versions": versions
    }


def test_a_bad_file_is_reported_with_its_name_and_line_and_nothing_is_sent(
    registry: RunningRegistry, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bad = str(files["bad.yaml"])
    code, out, err = run(capsys, "apply", "-f", str(files["mesh.yaml"]), bad, *at(registry))
    assert (code, out) == (1, "")
    first, last = err.splitlines()
    assert first.startswith(f"{bad}:5:") and "timeout" in first
    assert last == "1 problem found: nothing sent"
    # every problem, of every file
    files["mesh.yaml"].write_text(MESH.replace("kind: Mesh", "kind: Nope"), encoding="utf-8")
    code, _, err = run(capsys, "apply", "-f", str(files["mesh.yaml"]), bad, *at(registry))
    assert code == 1 and err.endswith("2 problems found: nothing sent\n")
    assert err.startswith(f"{files['mesh.yaml']}:2:") and f"\n{bad}:5:" in err
    # a file that cannot be read is a problem too
    missing = str(files["mesh.yaml"].parent / "missing.yaml")
    code, _, err = run(capsys, "apply", "-f", missing, *at(registry))
    assert (code, err) == (
        1,
        f"{missing}: cannot read file: No such file or directory\n1 problem found: nothing sent\n",
    )
    assert registry.client().policy().version == 0


def test_dry_run_validates_and_sends_nothing(
    registry: RunningRegistry, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    mesh, reviews = str(files["mesh.yaml"]), str(files["reviews.yaml"])
    code, out, _ = run(capsys, "apply", "--dry-run", "-f", mesh, reviews, *at(registry))
    size = len((MESH + "---\n" + REVIEWS).encode())
    assert (code, out) == (
        0,
        f"valid: would send 2 document(s), {size} bytes, as {mesh}+{reviews} to {registry.url}\n",
    )
    code, out, _ = run(capsys, "apply", "--dry-run", "-f", mesh, "--if-match", "4", "-o", "json")
    assert json.loads(out) == {
        "dry_run": True,
        "source": mesh,
        "bytes": len(MESH.encode()),
        "documents": 1,
        "if_match": 4,
    }
    assert registry.client().policy().version == 0


def test_if_match_conflicts_print_the_current_version(
    registry: RunningRegistry, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    mesh = str(files["mesh.yaml"])
    assert run(capsys, "apply", "-f", mesh, "--if-match", "0", *at(registry))[0] == 0
    files["mesh.yaml"].write_text(MESH.replace("strict", "permissive"), encoding="utf-8")
    code, out, err = run(capsys, "apply", "-f", mesh, "--if-match", "0", *at(registry))
    assert (code, out) == (1, "")
    assert err == (
        "meshctl apply: version conflict: the registry is at version 1; "
        "re-read it (meshctl get policy) and apply again\n"
    )
    assert run(capsys, "rollback", "1", "--if-match", "7", *at(registry))[2].startswith(
        "meshctl rollback: version conflict: the registry is at version 1;"
    )
    assert run(capsys, "apply", "-f", mesh, "--if-match", "1", *at(registry))[1] == (
        "applied version 2\n"
    )


def test_a_registry_side_rejection_prints_every_problem(
    registry: RunningRegistry,
    files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A registry whose loader is stricter than meshctl's (a newer release than this meshctl):
    # the policy passes the local check and is refused by the registry with two problems. The
    # registry runs in this process (a uvicorn thread), so its loader can be swapped.
    def stricter(text: str | bytes, *, source: str = "<string>", version: int = 0) -> object:
        raise ConfigError(
            [
                Problem(source, 4, 1, "spec.mtls", "strict is not allowed here"),
                Problem(source, 9, 2, "spec", "reviews needs a port"),
            ]
        )

    monkeypatch.setattr("meshlib.control.app.load_text", stricter)
    mesh, reviews = str(files["mesh.yaml"]), str(files["reviews.yaml"])
    code, out, err = run(capsys, "apply", "-f", mesh, "-f", reviews, *at(registry))
    source = f"{mesh}+{reviews}"  # X-Mesh-Source: what the registry names in its problems
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"{source}:4 (document 1): spec.mtls: strict is not allowed here",
        f"{source}:9 (document 2): spec: reviews needs a port",
        f"meshctl apply: registry {registry.url} rejected the policy (2 problems)",
    ]


def test_reads_take_any_svid_and_writes_need_an_admin(
    registry: RunningRegistry, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    workload = registry.issue("default", "reviews")
    code, out, err = run(capsys, "apply", "-f", str(files["mesh.yaml"]), *at(registry, workload))
    assert (code, out) == (1, "")
    assert err.startswith(f"meshctl apply: registry {registry.url} refused: ")
    assert f"spiffe://{TD}/ns/default/sa/reviews" in err and len(err.splitlines()) == 1
    code, _, err = run(capsys, "rollback", "1", *at(registry, workload))
    assert code == 1 and " refused: " in err
    assert run(capsys, "get", "services", *at(registry, workload))[:2] == (
        0,
        "no services registered\n",
    )
    assert registry.client().policy().version == 0


def test_get_services_endpoints_and_instances(
    registry: RunningRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    reviews = registry.client(registry.issue("default", "reviews"))
    one = reviews.register("default", "reviews", "127.0.0.1", 8080, labels={"version": "v1"})
    two = reviews.register(
        "default",
        "reviews",
        "127.0.0.2",
        8081,
        labels={"version": "v2", "zone": "a"},
        metrics_port=9100,
    )
    error = "policy rejected: " + "x" * 80 + "\nsecond line"
    reviews.heartbeat("default", "reviews", one.id, applied_version=1)
    reviews.heartbeat("default", "reviews", two.id, rejected_version=2, error=error)
    ratings = registry.client(registry.issue("shop", "ratings"))
    ratings.register("shop", "ratings", "127.0.0.3", 9090)

    index = {s.service: s.index for s in registry.client().services()}
    code, out, _ = run(capsys, "get", "services", *at(registry))
    assert code == 0
    assert [line.split() for line in out.splitlines()] == [
        ["NAMESPACE", "SERVICE", "INSTANCES", "INDEX"],
        ["default", "reviews", "2", str(index["reviews"])],
        ["shop", "ratings", "1", str(index["ratings"])],
    ]
    services = json.loads(run(capsys, "get", "services", "-o", "json", *at(registry))[1])
    assert yaml.safe_load(run(capsys, "get", "services", "-o", "yaml", *at(registry))[1]) == (
        services
    )
    assert services["services"][0] == {
        "namespace": "default",
        "service": "reviews",
        "instances": 2,
        "index": index["reviews"],
    }

    code, out, _ = run(capsys, "get", "endpoints", "reviews", *at(registry))
    assert code == 0
    lines = [line.split() for line in out.splitlines()]
    assert lines[:2] == [
        ["reviews.default:", "index", str(index["reviews"])],
        ["ID", "ADDRESS", "PORT", "LABELS", "METRICS_PORT"],
    ]
    assert sorted(lines[2:]) == sorted(
        [
            [one.id, "127.0.0.1", "8080", "version=v1", "-"],
            [two.id, "127.0.0.2", "8081", "version=v2,zone=a", "9100"],
        ]
    )
    assert run(capsys, "get", "endpoints", "reviews.default", *at(registry))[1] == out
    shop = yaml.safe_load(
        run(capsys, "get", "endpoints", "ratings.shop", "-o", "yaml", *at(registry))[1]
    )
    assert (shop["namespace"], shop["service"], shop["index"]) == (
        "shop",
        "ratings",
        index["ratings"],
    )
    assert [e["port"] for e in shop["endpoints"]] == [9090]
    as_json = json.loads(
        run(capsys, "get", "endpoints", "ratings.shop", "-o", "json", *at(registry))[1]
    )
    assert as_json == shop and set(as_json["endpoints"][0]) == {
        "id",
        "address",
        "port",
        "labels",
        "metrics_port",
    }
    unknown = run(capsys, "get", "endpoints", "ratings", *at(registry))[1].splitlines()
    assert unknown[0].startswith("ratings.default: index ") and unknown[1] == "no live instances"
    assert run(capsys, "get", "endpoints", "reviews.", *at(registry))[0] == 2

    code, out, _ = run(capsys, "get", "instances", *at(registry))
    rows = {line.split()[0]: line for line in out.splitlines()[1:4]}
    assert code == 0 and out.splitlines()[0].split() == [
        "ID",
        "SERVICE",
        "ADDRESS",
        "HEARTBEAT",
        "APPLIED",
        "REJECTED",
        "ERROR",
    ]
    assert rows[one.id].split()[1:] == [
        "reviews.default",
        "127.0.0.1:8080",
        rows[one.id].split()[3],
        "1",
        "-",
        "-",
    ]
    cut = rows[two.id].split()
    assert cut[4:6] == ["-", "2"] and cut[-1].endswith("x…") and len(" ".join(cut[6:])) == 48
    assert "second line" not in out and "-o json has the whole ERROR" in out
    instances = json.loads(run(capsys, "get", "instances", "-o", "json", *at(registry))[1])
    assert yaml.safe_load(
        run(capsys, "get", "instances", "-o", "yaml", *at(registry))[1]
    ).keys() == {"instances"}
    by_id = {i["id"]: i for i in instances["instances"]}
    assert by_id[two.id]["error"] == error and by_id[two.id]["rejected_version"] == 2
    assert by_id[one.id]["applied_version"] == 1 and by_id[one.id]["identity"].endswith(
        "/ns/default/sa/reviews"
    )


def test_registry_status(
    registry: RunningRegistry, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "apply", "-f", str(files["mesh.yaml"]), *at(registry))[0] == 0
    status = json.loads(run(capsys, "registry", "status", "-o", "json", *at(registry))[1])
    assert status["policy_version"] == 1 and status["state"] == "serving"
    code, out, _ = run(capsys, "registry", "status", *at(registry))
    said = dict(line.split(":", 1) for line in out.splitlines())
    assert code == 0 and said["epoch"].strip() == status["epoch"]
    assert said["state"].strip() == "serving" and said["authoritative"].strip() == "yes"
    assert said["instances"].strip() == "0 in 0 service(s)"
    assert said["policy version"].strip() == "1"
    assert said["store"].strip() == f"sqlite:{registry.data / 'registry.db'}"
    assert (
        yaml.safe_load(run(capsys, "registry", "status", "-o", "yaml", *at(registry))[1]).keys()
        == status.keys()
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_registry_that_is_down_is_one_line(
    registry: RunningRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"https://127.0.0.1:{_free_port()}"
    for argv in (("get", "services"), ("history",), ("registry", "status")):
        code, out, err = run(
            capsys, *argv, "--registry", url, "--svid-dir", str(registry.admin_svid)
        )
        assert (code, out) == (1, "")
        assert err.startswith(f"meshctl {' '.join(argv)}: registry {url} unreachable: ")
        assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_registry_and_svid_come_from_options_or_the_environment(
    registry: RunningRegistry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run(capsys, "get", "services") == (
        2,
        "",
        "meshctl get services: no registry: pass --registry URL or set MESHLIB_REGISTRY\n",
    )
    assert run(capsys, "history", "--registry", registry.url) == (
        2,
        "",
        "meshctl history: no SVID: pass --svid-dir DIR or set MESHLIB_SVID_DIR\n",
    )
    code, _, err = run(capsys, "history", "--registry", registry.url, "--svid-dir", str(tmp_path))
    assert code == 1 and err.startswith(f"meshctl history: --svid-dir {tmp_path}: ")
    assert len(err.splitlines()) == 1
    assert run(capsys, "history", "--registry", "http://x:1", "--svid-dir", str(tmp_path))[0] == 2

    monkeypatch.setenv("MESHLIB_REGISTRY", registry.url.removeprefix("https://"))  # no scheme
    monkeypatch.setenv("MESHLIB_SVID_DIR", str(registry.admin_svid))
    assert run(capsys, "history") == (0, "no policy applied yet\n", "")


def test_joined_policy_drops_byte_order_marks_and_ends_lines() -> None:
    assert joined_policy(["\ufeffa: 1", "\ufeff---\nb: 2\n"]) == "a: 1\n---\n---\nb: 2\n"


@pytest.mark.timeout(60)
def test_apply_reads_standard_input_in_a_process(
    registry: RunningRegistry, files: dict[str, Path]
) -> None:
    env = {
        **os.environ,
        "MESHLIB_REGISTRY": registry.url,
        "MESHLIB_SVID_DIR": str(registry.admin_svid),
    }
    done = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", "apply", "-f", str(files["mesh.yaml"]), "-f", "-"],
        input=REVIEWS,
        capture_output=True,
        text=True,
        env=env,
        timeout=45,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "applied version 1\n", "")
    assert registry.client().policy().text == MESH + "---\n" + REVIEWS
    # a bad stdin is named <stdin> with its line; nothing is sent
    bad = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", "apply", "-f", "-"],
        input=BAD,
        capture_output=True,
        text=True,
        env=env,
        timeout=45,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("<stdin>:5:")
    assert registry.client().policy().version == 1


def test_the_new_verbs_complete(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    for path in ("apply", "get", "get/policy", "get/endpoints", "get/instances", "history"):
        assert f"meshctl/{path}" in script
    assert "meshctl/registry/status" in script and 'meshctl/get) words="policy services' in script
    assert "meshctl/apply:-o|meshctl/apply:--output" in script
