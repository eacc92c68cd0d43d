"""``meshctl`` validate / schema / explain, through ``main()`` and once as a real process."""

from __future__ import annotations

import functools
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cfgdocs import with_services
from config.gateway_conformance import CASES, DATA_DIR, ECHO_V2_POD, MESH_NAMESPACE, WEIGHTS, Case
from harness.conformance import SERVICES, services_yaml

from meshlib.cli import main
from meshlib.config.loader import NO_DOCUMENTS

ROUTES = """
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: reviews-routes}
spec:
  matches:
  - name: jason
    pathRegex: /reviews/.*
    headers: {end-user: jason}
"""
SPLIT = """
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: canary}
spec:
  service: reviews
  matches: [{kind: HTTPRouteGroup, name: reviews-routes}]
  backends:
  - {service: reviews-v1, weight: 30}
  - {service: reviews-v2, weight: 10}
"""
POLICY = """
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: svc}
spec:
  target: {service: reviews}
  timeout: 3s
  retries: {attempts: 9}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: route}
spec:
  target: {service: reviews, route: jason}
  timeout: 1s
---
apiVersion: meshlib/v1
kind: FaultInjection
metadata: {name: slow}
spec:
  target: {service: reviews}
  match: {headers: {end-user: jason}}
  delay: {fixed: 2s, percent: 50}
"""


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(with_services(ROUTES, SPLIT, POLICY))
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    text = with_services(SPLIT.replace("weight: 30", "weigth: 30"), "kind: TrafficSplitt\n")
    path.write_text(text)
    return path


def test_validate_ok(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(good)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == (
        f"{good}: ok (9 documents: 4 Service, 1 HTTPRouteGroup, 1 TrafficSplit, "
        "2 TrafficPolicy, 1 FaultInjection)"
    )
    assert "warning:" in err and "clamped" in err


def test_validate_json_keeps_a_file_name_with_a_comma_whole(
    good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = good.with_name("a, b.yaml")
    good.rename(odd)
    assert main(["validate", "-o", "json", str(odd)]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == [str(odd)]


def test_validate_reports_every_problem(bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert any(
        line.startswith(f"{bad}:")
        and "(document 5): spec.backends[0].weigth: unknown field" in line
        for line in lines
    )
    assert any("(document 6): kind:" in line for line in lines)
    assert lines[-1].endswith("problems found")


def test_validate_several_files_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    services = tmp_path / "services.yaml"
    services.write_text(with_services())
    split = tmp_path / "split.yaml"
    split.write_text(
        SPLIT.replace("  matches: [{kind: HTTPRouteGroup, name: reviews-routes}]\n", "")
    )
    assert main(["validate", str(services), str(split)]) == 0
    assert "5 documents" in capsys.readouterr().out
    assert main(["validate", str(split)]) == 1  # alone, its services are dangling
    assert "not declared" in capsys.readouterr().err


def test_validate_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate"]) == 2
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read file" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["", "---\n", "# only a comment\n"])
def test_validate_empty_file_fails_with_a_one_line_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert line == f"{path}:1: {NO_DOCUMENTS}"


HUGE = "9" * 400
#: (the input named in issue 8, its document, the field the one-line reason names)
BAD_INPUTS = [
    (
        "duration",
        "apiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
        f"spec: {{timeout: '{HUGE}s'}}\n",
        "spec.timeout",
    ),
    (
        "rate",
        "apiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
        "spec: {rateLimit: {requestsPerSecond: .inf}}\n",
        "spec.rateLimit.requestsPerSecond",
    ),
    (
        "sampling",
        f"apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {{name: m}}\n"
        f"spec: {{tracing: {{sampling: {HUGE}}}}}\n",
        "spec.tracing.sampling",
    ),
    ("apiVersion", "apiVersion: {a: 1}\nkind: Service\nmetadata: {name: s}\n", "apiVersion"),
    (
        "labels",
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: s}\n"
        "spec: {endpoints: [{address: 'h:1', labels: [a, b]}]}\n",
        "spec.endpoints[0].labels",
    ),
    (
        "jwks",
        "apiVersion: meshlib/v1\nkind: RequestAuthentication\nmetadata: {name: j}\n"
        f"spec: {{jwtRules: [{{issuer: i, jwks: '{'[' * 100_000}'}}]}}\n",
        "spec.jwtRules[0].jwks",
    ),
]


@pytest.mark.parametrize(("label", "text", "field"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_validate_names_file_line_and_field_of_each_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], label: str, text: str, field: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{path}:") and f" {field}: " in line, label
    assert len(line) < 300, label  # the value is named, not printed


def test_schema_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    schema = json.loads(out)
    assert schema["$schema"].endswith("2020-12/schema")
    assert out.startswith('{\n  "$schema"')


def test_explain_matching_route(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", str(good), "--service", "reviews", "--path", "/reviews/1"]
    assert main([*argv, "--header", "End-User=jason"]) == 0
    out = capsys.readouterr().out
    assert "route:    jason" in out
    assert "split:    default/canary" in out
    assert "reviews-v1.default  weight 30  75.0%" in out
    assert "reviews-v2.default  weight 10  25.0%" in out
    assert "127.0.0.1:9081" in out
    policy = {
        line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")
    }
    assert policy["timeout"] == ["1s", "route:default/route"]
    assert policy["retries.attempts"] == ["4", "service:default/svc"]
    assert policy["loadBalancer.type"] == ["p2c-ewma", "default"]
    assert "delay 2s on 50% when end-user=jason (matches this request)" in out


def test_explain_without_match_goes_to_root(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", str(good), "--service", "reviews.default", "--path", "/other"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "route:    (none" in out
    assert "does not apply" in out and "backend:  reviews.default (100%)" in out
    assert "3s" in out and "does not match this request" in out


def test_explain_errors(good: Path, bad: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["explain", str(good), "--path", "/"]
    assert main([*base, "--service", "nope"]) == 2
    assert "not a mesh service" in capsys.readouterr().err
    assert main([*base, "--service", "reviews", "--header", "novalue"]) == 2
    assert main(["explain", str(bad), "--service", "reviews", "--path", "/"]) == 1
    assert main(["explain", str(good), "--service", "reviews"]) == 2  # --path missing
    capsys.readouterr()


def test_console_script_end_to_end(good: Path, bad: Path) -> None:
    script = Path(sys.executable).parent / "meshctl"
    if not script.exists():
        pytest.skip("meshctl console script not installed (pip install -e .)")
    ok = subprocess.run([str(script), "validate", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and ": ok (" in ok.stdout
    ko = subprocess.run([str(script), "validate", str(bad)], capture_output=True, text=True)
    assert ko.returncode == 1 and "weigth" in ko.stderr
    empty = good.with_name("empty.yaml")
    empty.write_text("")
    none = subprocess.run([str(script), "validate", str(empty)], capture_output=True, text=True)
    assert none.returncode == 1 and none.stderr == f"{empty}:1: {NO_DOCUMENTS}\n"


# --- issue 10: validate warns of routed services without endpoints (item 6) -------------------

LONELY = """\
apiVersion: meshlib/v1
kind: Service
metadata: {name: ratings}
spec: {serviceAccount: ratings}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: details}
spec: {endpoints: [{address: "127.0.0.1:9090"}]}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: shop}
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: shop-split}
spec:
  service: shop
  backends: [{service: details, weight: 1}]
"""


def test_validate_warns_of_a_routed_service_without_endpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(LONELY)
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{path}: ok (4 documents")
    # ratings has no endpoints; details has some; shop is the root of a split without matches,
    # so every call to it goes to a backend: only ratings is named.
    [line] = err.splitlines()
    assert line.startswith(f"warning: {path}:1 (document 1): spec.endpoints: Service 'ratings'")
    assert "NoHealthyEndpointsError" in line


# --- issue 10: -o json|yaml (item 8) ----------------------------------------------------------

PROBLEM_KEYS = ["file", "line", "column", "document", "field", "message"]


def test_validate_output_json_keys_are_stable(
    good: Path, bad: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(good), "-o", "json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert list(doc) == ["ok", "files", "documents", "kinds", "problems", "warnings"]
    assert doc["ok"] is True and doc["files"] == [str(good)] and doc["documents"] == 9
    assert doc["kinds"] == {
        "Service": 4,
        "HTTPRouteGroup": 1,
        "TrafficSplit": 1,
        "TrafficPolicy": 2,
        "FaultInjection": 1,
    }
    assert doc["problems"] == []
    assert all(list(w) == PROBLEM_KEYS for w in doc["warnings"])
    assert {w["field"] for w in doc["warnings"]} == {"spec.retries.attempts", "spec.endpoints"}
    assert "warning:" in err  # the human lines stay on stderr

    assert main(["validate", str(bad), "--output", "json"]) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["ok"] is False and doc["documents"] == 0 and doc["warnings"] == []
    assert all(list(p) == PROBLEM_KEYS for p in doc["problems"])
    assert any(p["field"] == "spec.backends[0].weigth" for p in doc["problems"])
    assert err.strip().splitlines()[-1].endswith("problems found")


def test_validate_output_yaml_is_the_same_document(
    good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    assert main(["validate", str(good), "-o", "json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert main(["validate", str(good), "-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == as_json


def test_explain_output_json_keys_are_stable(
    good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["explain", str(good), "--service", "reviews", "--path", "/reviews/1"]
    assert main([*argv, "--header", "end-user=jason", "--caller", "none", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc) == [
        "request",
        "service",
        "route",
        "split",
        "backends",
        "policy",
        "faults",
        "mirrors",
        "authz",
    ]
    assert doc["request"] == {
        "method": "GET",
        "path": "/reviews/1",
        "headers": {"end-user": "jason"},
    }
    assert doc["service"] == "reviews.default" and doc["route"] == "jason"
    assert doc["split"] == {"name": "default/canary", "applies": True}
    [v1, v2] = doc["backends"]
    assert list(v1) == ["service", "weight", "share", "endpoints"]
    assert (v1["service"], v1["weight"], v1["share"]) == ("reviews-v1.default", 30, 75.0)
    assert v1["endpoints"] == [{"address": "127.0.0.1:9081", "weight": 1, "labels": {}}]
    assert v2["share"] == 25.0
    policy = {row["field"]: row for row in doc["policy"]}
    assert all(list(row) == ["field", "value", "source"] for row in doc["policy"])
    assert policy["timeout"] == {"field": "timeout", "value": "1s", "source": "route:default/route"}
    assert policy["retries.perTryTimeout"]["value"] == "none"
    assert policy["rateLimit"]["source"] == "default"
    [fault] = doc["faults"]
    assert list(fault) == ["name", "delay", "abort", "headers", "matches_request"]
    assert fault["delay"] == {"fixed": "2s", "percent": 50.0} and fault["matches_request"]
    assert doc["mirrors"] == []
    assert list(doc["authz"]) == ["caller", "allowed", "audit_would_deny", "mode", "rule", "path"]
    assert doc["authz"]["caller"] is None and doc["authz"]["allowed"] is True

    assert main(["explain", str(good), "--service", "reviews", "--path", "/x", "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["route"] is None and doc["authz"] is None
    assert doc["split"] == {"name": "default/canary", "applies": False}
    assert doc["backends"][0]["weight"] is None and doc["backends"][0]["share"] == 100.0


# --- issue 10: explain names fields as the policy file does, in aligned columns (item 12) -----


def test_explain_prints_policy_file_field_names_in_aligned_columns(
    good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from meshlib.config.schema import POLICY_FIELDS

    argv = ["explain", str(good), "--service", "reviews", "--path", "/reviews/1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index("policy:") + 1
    rows = list(itertools.takewhile(lambda line: line.startswith("  "), lines[start:]))
    names = [row.split()[0] for row in rows]
    assert "retries.perTryTimeout" in names and "per_try_timeout" not in out
    # every name is a field of the file (rateLimit's two fields make one row)
    file_fields = {pf.yaml_path for pf in POLICY_FIELDS} | {"rateLimit"}
    assert set(names) <= file_fields
    assert len(names) == len({pf.model_name for pf in POLICY_FIELDS})
    # aligned: each column starts at the same offset on every row
    value_at = {row.index(row.split()[1], len(row.split()[0]) + 2) for row in rows}
    source_at = {row.rindex(" ") + 1 for row in rows}
    assert len(value_at) == 1 and len(source_at) == 1
    assert "retries.retryable" in names
    assert rows[names.index("hedging.enabled")].split()[1] == "false"  # YAML's spelling


# --- issue 10: validate reads '-' and directories (item 10) -----------------------------------


def test_validate_reads_stdin_and_directories_through_the_console_script(
    tmp_path: Path, good: Path
) -> None:
    script = Path(sys.executable).parent / "meshctl"
    if not script.exists():
        pytest.skip("meshctl console script not installed (pip install -e .)")

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), *args], input=stdin, capture_output=True, text=True, timeout=60
        )

    piped = run("validate", "-", stdin=good.read_text())
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("<stdin>: ok (9 documents")
    broken = run("validate", "-", stdin="kind: Servic\n")
    assert broken.returncode == 1 and broken.stderr.startswith("<stdin>:1:7 (document 1): ")
    empty_stdin = run("validate", "-")
    assert empty_stdin.returncode == 1 and empty_stdin.stderr == f"<stdin>:1: {NO_DOCUMENTS}\n"

    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "b-split.yml").write_text(
        SPLIT.replace("  matches: [{kind: HTTPRouteGroup, name: reviews-routes}]\n", "")
    )
    (conf / "a-services.yaml").write_text(with_services())
    (conf / "README.md").write_text("not policy")
    (conf / ".#a-services.yaml").write_text("an editor's lock file")
    (conf / "sub").mkdir()
    (conf / "sub" / "c.yaml").write_text("kind: Nope\n")  # not recursive
    together = run("validate", str(conf), "-o", "json")
    assert together.returncode == 0, together.stderr
    doc = json.loads(together.stdout)
    assert doc["files"] == [str(conf / "a-services.yaml"), str(conf / "b-split.yml")]
    assert doc["documents"] == 5

    mixed = run("validate", str(conf / "a-services.yaml"), "-", stdin=SPLIT.split("  matches")[0]
                + "  backends:\n  - {service: reviews-v1, weight: 1}\n")  # fmt: skip
    assert mixed.returncode == 0, mixed.stderr

    hollow = tmp_path / "hollow"
    hollow.mkdir()
    (hollow / "notes.txt").write_text("")
    nothing = run("validate", str(hollow))
    assert nothing.returncode == 1
    assert nothing.stderr == f"{hollow}: the directory holds no *.yaml or *.yml file\n"
    twice = run("validate", "-", "-")
    assert twice.returncode == 2 and twice.stderr.count("\n") == 1 and "once" in twice.stderr


# --- issue 10: --version, version (item 7) and completion (item 9) ----------------------------


def test_version_flag_and_verb(capsys: pytest.CaptureFixture[str]) -> None:
    import meshlib

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"meshctl {meshlib.__version__}\n"
    assert main(["version"]) == 0
    assert capsys.readouterr().out == f"meshctl {meshlib.__version__}\n"


@functools.cache
def _verbs() -> frozenset[str]:
    """Every verb and nested verb meshctl has, read from --help (not from the generator)."""

    def listed(argv: list[str]) -> list[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "meshlib.cli", *argv, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # argparse lists the verbs under the VERB heading, indented by four spaces.
        verbs = re.findall(r"^    ([a-z][a-z-]*)(?:\s|$)", proc.stdout, re.MULTILINE)
        assert verbs, proc.stdout
        return verbs

    return frozenset(listed([])) | frozenset(listed(["ca"]))


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_names_every_verb(shell: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for verb in _verbs() | {"inspect", "completion", "version"}:
        assert re.search(rf"\b{verb}\b", script), f"{shell} script does not offer {verb!r}"
    assert "json yaml" in script  # option choices are offered too
    assert main(["completion", "tcsh"]) == 2


CA_VERBS = ["init", "issue", "inspect", "rotate", "bundle", "revoke"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_script_completes_in_bash(tmp_path: Path) -> None:
    script = tmp_path / "meshctl.bash"
    proc = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", "completion", "bash"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    script.write_text(proc.stdout)
    probe = f"""
source {script}
complete -p meshctl
t() {{ COMP_WORDS=("$@"); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); COMPREPLY=(); _meshctl;
       echo "${{COMPREPLY[*]}}"; }}
t meshctl ''
t meshctl ca in
t meshctl validate -o ''
t meshctl completion z
t meshctl ca inspect cert.pem --b
t meshctl validate ''
"""
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "complete -o default -F _meshctl meshctl"
    assert set(lines[1].split()) == {v for v in _verbs() if v not in CA_VERBS}
    assert lines[2:] == ["init inspect", "text json yaml", "zsh", "--bundle", ""]


def _script(shell: str, tmp_path: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "meshlib.cli", "completion", shell],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / f"meshctl.{shell}"
    path.write_text(proc.stdout)
    return path


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_script_completes_in_zsh(tmp_path: Path) -> None:
    script = _script("zsh", tmp_path)
    # Outside a completion widget words/CURRENT are plain variables and compadd/_files can be
    # stood in for: the script's own logic runs in a real zsh.
    probe = f"""
compdef() {{ print -r -- "compdef $*"; }}
compadd() {{ shift; print -r -- "${{(P)1}}"; }}
_files() {{ print -r -- FILES; }}
source {script}
t() {{ words=("$@"); CURRENT=${{#words}}; _meshctl; }}
t meshctl ''
t meshctl ca in
t meshctl validate -o ''
t meshctl validate ''
"""
    done = subprocess.run(["zsh", "-f", "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "compdef _meshctl meshctl"
    assert set(lines[1].split()) == {v for v in _verbs() if v not in CA_VERBS}
    assert lines[2:] == [" ".join(CA_VERBS), "text json yaml", "FILES"]


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completion_script_completes_in_fish(tmp_path: Path) -> None:
    script = _script("fish", tmp_path)
    probe = (
        f"source {script}; complete -C 'meshctl ca in'; echo ==; "
        "complete -C 'meshctl validate -o '; echo ==; complete -C 'meshctl '"
    )
    done = subprocess.run(["fish", "-N", "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    ca, output, top = (
        [line.split("\t")[0] for line in part.strip().splitlines()]
        for part in done.stdout.split("==\n")
    )
    assert ca == ["init", "inspect"]
    assert output == ["json", "text", "yaml"]
    assert set(top) == {v for v in _verbs() if v not in CA_VERBS}


def test_validate_names_what_to_drop_from_a_url_given_as_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text(
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: ratings}\n"
        'spec:\n  endpoints:\n  - address: "http://127.0.0.1:9080"\n'
    )
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:6"), err  # the line of the address (a column may follow)
    assert (
        "spec.endpoints[0].address: address 'http://127.0.0.1:9080':"
        " drop the scheme: write host:port, like '127.0.0.1:9080'"
    ) in err, err
    assert "brackets" not in err


# --- issue 14: explain under Gateway API HTTPRoutes: which rule matched and why ---------------

SHOP = """\
apiVersion: meshlib/v1
kind: Mesh
metadata: {name: mesh}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {endpoints: [{address: "127.0.0.1:9200"}]}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: web-v1, namespace: shop}
spec: {endpoints: [{address: "127.0.0.1:9201"}]}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: web-v2, namespace: shop}
spec: {endpoints: [{address: "127.0.0.1:9202"}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-routes, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - name: search
    matches:
    - path: {type: Exact, value: /search}
      queryParams: [{name: animal, value: whale}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: search}]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-served-by, value: web}]}
    - type: RequestMirror
      requestMirror: {backendRef: {name: web-v2, port: 8080}, percent: 10}
    backendRefs:
    - {name: web-v1, port: 8080, weight: 3}
    - {name: web-v2, port: 8080, weight: 1}
    - {name: ghost, port: 8080, weight: 1}
    timeouts: {request: 2s, backendRequest: 500ms}
  - name: old
    matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
        statusCode: 301
  - name: api
    matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: api.internal
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /}
    backendRefs: [{name: web-v2, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-admin, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 8080}]
  rules: [{backendRefs: [{name: web-v1, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-from-tools, namespace: tools}
spec:
  parentRefs: [{group: "", kind: Service, name: web, namespace: shop}]
  rules: [{backendRefs: [{name: web-v1, namespace: shop, port: 8080}]}]
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: search-retries, namespace: shop}
spec:
  target: {service: web, route: search}
  retries: {attempts: 3}
"""


def _route_line(name: str) -> int:
    """The line of the HTTPRoute ``name``'s document in SHOP (its apiVersion line)."""
    return SHOP[: SHOP.index(f"metadata: {{name: {name},")].count("\n") - 1


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    path = tmp_path / "shop.yaml"
    path.write_text(SHOP)
    return path


def _explain_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(["explain", *argv, "-o", "json"]) == 0
    out = capsys.readouterr().out
    doc: dict[str, object] = json.loads(out)
    return doc


def test_explain_httproute_query_match_backends_filters_timeouts_and_policy(
    shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["explain", str(shop), "--service", "web.shop", "--path", "/search?animal=whale"]
    assert main([*argv, "--header", "X-Route=mine"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[2] == "httproutes: (caller namespace default, port 80)"
    line = _route_line("web-routes")
    assert f"  attached:     HTTPRoute shop/web-routes (producer)  {shop}:{line}" in lines
    assert (
        "  not attached: HTTPRoute shop/web-admin (producer): its parentRef names port 8080;"
        " the call dials port 80"
    ) in lines
    assert (
        "  not attached: HTTPRoute tools/web-from-tools (consumer): a consumer route: it applies"
        " only to callers in namespace tools, the caller is in default"
    ) in lines
    i = lines.index("tried:    (precedence order)")
    assert lines[i + 1 : i + 4] == [
        "  1. HTTPRoute shop/web-routes rule[0] 'search' matches[0]: path Exact '/search',"
        " query animal Exact 'whale'",
        "       matched",
        "  (2 lower-precedence candidate(s) not tried)",
    ]
    assert "rule:     HTTPRoute shop/web-routes rule[0] 'search'" in lines
    assert "timeouts: request 2s, backendRequest 500ms" in lines
    assert "result:   forwarded; 20% of requests get 500 invalid_backend" in lines
    assert "mirror:   10% copied to web-v2.shop:8080" in lines
    j = lines.index("backend:  web-v1.shop:8080  weight 3  60.0%")
    assert lines[j + 1 : j + 5] == [
        "            127.0.0.1:9201  weight 1",
        "            sees: /search?animal=whale  host web.shop",
        "            header x-route: search",  # set replaces the caller's value
        "            response headers: add x-served-by: web",
    ]
    assert "backend:  web-v2.shop:8080  weight 1  20.0%" in lines
    k = lines.index("backend:  ghost.shop:8080  weight 1  20.0%")
    assert "not a declared mesh Service" in lines[k + 1] and "500 invalid_backend" in lines[k + 1]
    assert "route:    search (the label for policy, faults and metrics)" in lines
    policy = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    # the rule's own timeouts win over every scope; the TrafficPolicy on the label applies
    assert policy["timeout"] == ["2s", "route:HTTPRoute", "shop/web-routes"]
    assert policy["retries.perTryTimeout"] == ["500ms", "route:HTTPRoute", "shop/web-routes"]
    assert policy["retries.attempts"] == ["3", "route:shop/search-retries"]
    assert "  shop/web-routes: 10% copied to web-v2.shop" in lines

    doc = _explain_json(capsys, *argv[1:])
    assert list(doc) == [
        "request",
        "service",
        "http",
        "route",
        "split",
        "backends",
        "policy",
        "faults",
        "mirrors",
        "authz",
    ]
    assert doc["request"] == {"method": "GET", "path": "/search?animal=whale", "headers": {}}
    assert doc["route"] == "search" and doc["split"] is None
    http = doc["http"]
    assert isinstance(http, dict)
    assert (http["outcome"], http["status"], http["invalid_share"]) == ("forward", None, 20.0)
    assert http["rule"] == {
        "where": "HTTPRoute shop/web-routes rule[0] 'search'",
        "match": "HTTPRoute shop/web-routes rule[0] 'search' matches[0]: path Exact '/search',"
        " query animal Exact 'whale'",
        "route": "search",
    }
    assert http["timeouts"] == {"request": "2s", "backendRequest": "500ms"}
    assert [b["service"] for b in http["backends"]] == ["web-v1.shop", "web-v2.shop", None]
    assert [b["share"] for b in http["backends"]] == [60.0, 20.0, 20.0]
    assert http["backends"][0]["request"] == {
        "path": "/search?animal=whale",
        "host": "web.shop",
        "headers": [["x-route", "search"]],
    }
    assert http["backends"][0]["response_headers"] == [
        {"set": [], "add": [["x-served-by", "web"]], "remove": []}
    ]
    assert [b["service"] for b in doc["backends"]] == ["web-v1.shop", "web-v2.shop", "ghost.shop"]  # type: ignore[index, union-attr]


def test_explain_httproute_no_route_lists_why_each_candidate_failed(
    shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The spec: of a query parameter given twice only the first counts.
    argv = ["explain", str(shop), "--service", "web", "--namespace", "shop"]
    assert main([*argv, "--path", "/search?animal=dog&animal=whale"]) == 0
    lines = capsys.readouterr().out.splitlines()
    i = lines.index("tried:    (precedence order)")
    assert lines[i + 1 :] == [
        "  1. HTTPRoute shop/web-routes rule[0] 'search' matches[0]: path Exact '/search',"
        " query animal Exact 'whale'",
        "       no: query animal Exact 'whale' (request 'dog')",
        "  2. HTTPRoute shop/web-routes rule[2] 'api' matches[0]: path PathPrefix '/api',"
        " method POST",
        "       no: path PathPrefix '/api' (request '/search'); method POST (request GET)",
        "  3. HTTPRoute shop/web-routes rule[1] 'old' matches[0]: path PathPrefix '/old'",
        "       no: path PathPrefix '/old' (request '/search')",
        "result:   404 no_route (no candidate matches; the mesh answers itself)",
        "policy:   (none: the mesh answers this request itself)",
    ]
    doc = _explain_json(capsys, str(shop), "--service", "web.shop", "--path", "/search")
    http = doc["http"]
    assert isinstance(http, dict)
    assert (http["outcome"], http["status"], http["rule"]) == ("no_route", 404, None)
    assert http["tried"][0]["failed"] == ["query animal Exact 'whale' (request has none)"]
    assert doc["route"] is None and doc["backends"] == [] and doc["policy"] == []


def test_explain_httproute_redirect_rewrite_and_attachment(
    shop: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [str(shop), "--service", "web.shop"]
    doc = _explain_json(capsys, *base, "--path", "/old/x?y=1")
    http = doc["http"]
    assert isinstance(http, dict)
    assert (http["outcome"], http["status"]) == ("redirect", 301)
    assert http["redirect"] == {"status": 301, "location": "http://web.shop/new/x?y=1"}
    assert doc["route"] == "old" and doc["policy"] == [] and doc["backends"] == []

    doc = _explain_json(capsys, *base, "--path", "/api/items", "--method", "post")
    http = doc["http"]
    assert isinstance(http, dict)
    [backend] = http["backends"]
    assert backend["request"] == {"path": "/items", "host": "api.internal", "headers": []}
    assert [c["failed"] for c in http["tried"]] == [
        [
            "path Exact '/search' (request '/api/items')",
            "query animal Exact 'whale' (request has none)",
        ],
        [],
    ]

    # a parentRef port decides attachment: on 8080 only web-admin attaches
    doc = _explain_json(capsys, *base, "--path", "/search?animal=whale", "--port", "8080")
    http = doc["http"]
    assert isinstance(http, dict)
    assert [r["name"] for r in http["attached"]] == ["shop/web-admin"]
    assert http["not_attached"][0]["reason"] == (
        "its parentRef names port 80; the call dials port 8080"
    )
    assert doc["route"] == "web-admin"

    # GAMMA: a consumer route replaces the producer routes for callers in its namespace
    doc = _explain_json(capsys, *base, "--path", "/old", "--namespace", "tools")
    http = doc["http"]
    assert isinstance(http, dict)
    assert http["attached"] == [
        {
            "name": "tools/web-from-tools",
            "role": "consumer",
            "source": f"{shop}:{_route_line('web-from-tools')}",
        }
    ]
    assert http["not_attached"][0] == {
        "name": "shop/web-routes",
        "role": "producer",
        "source": f"{shop}:{_route_line('web-routes')}",
        "reason": "a producer route, replaced for callers in namespace tools by their own"
        " consumer route(s)",
    }
    assert http["outcome"] == "forward" and doc["route"] == "web-from-tools"

    assert main(["explain", *base, "--path", "/", "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err


def test_explain_httproute_none_attached_falls_back_to_the_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "shop.yaml"
    path.write_text(SHOP)
    argv = ["explain", str(path), "--service", "web.shop", "--path", "/", "--port", "9090"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  none attaches: the call is routed as without HTTPRoutes" in lines
    assert "backend:  web.shop (100%)" in lines
    doc = _explain_json(capsys, *argv[1:])
    http = doc["http"]
    assert isinstance(http, dict)
    assert http["outcome"] == "not_attached" and http["attached"] == []
    assert [(r["name"], r["reason"]) for r in http["not_attached"]] == [
        ("shop/web-routes", "its parentRef names port 80; the call dials port 9090"),
        ("shop/web-admin", "its parentRef names port 8080; the call dials port 9090"),
        (
            "tools/web-from-tools",
            "a consumer route: it applies only to callers in namespace tools,"
            " the caller is in default",
        ),
    ]
    assert doc["route"] is None and len(doc["policy"]) > 0  # type: ignore[arg-type]


def _conformance_cases() -> list[Case]:
    """The transcribed upstream cases explain can answer: a manifest, the Service dialled by
    name (not a pod address), no Host header override (explain has no Host header of its own)."""
    return [
        c
        for c in CASES
        if c.manifest is not None
        and not c.host.startswith(ECHO_V2_POD)
        and all(name.lower() != "host" for name, _ in c.headers)
    ]


@pytest.fixture(scope="module")
def conformance_services(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The meshlib Services of the upstream base manifests (echo, echo-v1, echo-v2)."""
    path = tmp_path_factory.mktemp("conformance") / "services.yaml"
    addresses = {name: f"127.0.0.1:{9300 + i}" for i, name in enumerate(SERVICES)}
    path.write_text(services_yaml(addresses))
    return path


@pytest.mark.parametrize(
    "case", _conformance_cases(), ids=lambda c: f"{c.test}:{c.method}:{c.host}{c.path}"
)
def test_explain_agrees_with_the_gateway_api_conformance_tables(
    case: Case, conformance_services: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Explain's verdict for each upstream request is the one the upstream test expects: the
    backend (or 404, or the redirect's Location), the path and headers the backend sees, the
    response header edits."""
    manifest = Path(__file__).resolve().parents[2] / DATA_DIR / str(case.manifest)
    host, _, port = case.host.partition(":")
    argv = [str(conformance_services), str(manifest), "--service", host, "--path", case.path]
    argv += ["--namespace", case.client_namespace, "--method", case.method]
    argv += ["--port", port or "80"]
    for name, value in case.headers:
        argv += ["--header", f"{name}={value}"]
    doc = _explain_json(capsys, *argv)
    http: Any = doc.get("http")
    if case.status == 404:
        assert http["outcome"] == "no_route" and http["status"] == 404
        assert all(c["failed"] for c in http["tried"])
        return
    if case.redirect is not None:
        assert http["outcome"] == "redirect" and http["status"] == case.status
        location = urlsplit(http["redirect"]["location"])
        want = case.redirect
        assert want.scheme is None or location.scheme == want.scheme
        assert want.host is None or location.hostname == want.host
        assert want.port is None or str(location.port) == want.port
        assert want.path is None or location.path == want.path
        return
    assert case.status == 200
    if case.test in WEIGHTS:
        shares = {b["backend"]: b["share"] for b in http["backends"]}
        assert shares == {
            f"{name}.{MESH_NAMESPACE}": 100.0 * share for name, share in WEIGHTS[case.test].items()
        }
        return
    backends: Any = doc["backends"]
    if http is None or http["outcome"] == "not_attached":
        assert [b["service"] for b in backends] == [f"{case.backend}.{MESH_NAMESPACE}"]
        assert not case.response_headers  # no route: nothing edits the response
        return
    assert http["outcome"] == "forward"
    [chosen] = [b for b in http["backends"] if b["share"] == 100.0]
    if case.backend is not None:
        assert chosen["service"] == f"{case.backend}.{MESH_NAMESPACE}"
    seen = chosen["request"]
    if case.backend_path is not None:
        assert seen["path"] == case.backend_path
    values: dict[str, list[str]] = {}
    for name, value in seen["headers"]:
        values.setdefault(name.lower(), []).append(value)
    for name, value in case.backend_headers:
        assert ",".join(values.get(name.lower(), [])) == value, name
    for name in case.backend_absent:
        assert name.lower() not in values
    set_or_added = {
        name.lower(): value
        for m in chosen["response_headers"]
        for name, value in [*m["set"], *m["add"]]
    }
    for name, value in case.response_headers:
        assert set_or_added.get(name.lower()) == value
    for name in case.response_absent:
        assert name.lower() not in set_or_added


def test_explain_the_vendored_matching_manifest_in_words(
    conformance_services: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``/v2example`` is not under ``/v2`` (prefixes match whole path elements), so the
    ``/v2`` rule fails on its path and the ``/`` rule wins; each failure is named."""
    manifest = (
        Path(__file__).resolve().parents[2]
        / DATA_DIR
        / "conformance/tests/mesh/httproute-matching.yaml"
    )
    argv = ["explain", str(conformance_services), str(manifest), "--service", "echo"]
    argv += ["--namespace", MESH_NAMESPACE, "--path", "/v2example"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    where = "HTTPRoute gateway-conformance-mesh/mesh-matching"
    i = lines.index("tried:    (precedence order)")
    assert lines[i + 1 : i + 10] == [
        f"  1. {where} rule[1] matches[0]: path PathPrefix '/v2'",
        "       no: path PathPrefix '/v2' (request '/v2example')",
        f"  2. {where} rule[0] matches[1]: path PathPrefix '/', header version Exact 'one'",
        "       no: header version Exact 'one' (request has none)",
        f"  3. {where} rule[1] matches[1]: path PathPrefix '/', header version Exact 'two'",
        "       no: header version Exact 'two' (request has none)",
        f"  4. {where} rule[0] matches[0]: path PathPrefix '/'",
        "       matched",
        f"rule:     {where} rule[0]",
    ]
    assert "backend:  echo-v1.gateway-conformance-mesh:8080  weight 1  100.0%" in lines
    assert "route:    mesh-matching (the label for policy, faults and metrics)" in lines
    assert "policy:" in lines
