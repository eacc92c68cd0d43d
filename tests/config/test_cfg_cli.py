"""``meshctl`` validate / schema / explain, through ``main()`` and once as a real process."""

from __future__ import annotations

import json
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
    assert policy["load_balancer.kind"] == ["p2c-ewma", "default"]
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
