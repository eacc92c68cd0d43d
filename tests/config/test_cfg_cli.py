"""``meshctl`` validate / schema / explain, through ``main()`` and once as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cfgdocs import with_services

from meshlib.cli import main

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
