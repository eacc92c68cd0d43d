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

import pytest
from cfgdocs import with_services

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
