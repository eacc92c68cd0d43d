"""Smoke test of the benchmark harness: ``benchmarks/run.py --quick --scenario overhead`` (and
``--scenario overflow``).

Runs the harness as CI does (a subprocess on loopback, ~5-10 s) and checks it exits 0 and prints the
overhead table with measured rows for raw httpx and meshlib (and nginx, when a binary exists). The
numbers themselves are not checked: a quick run is far too short to mean anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_PY = REPO_ROOT / "benchmarks" / "run.py"

pytestmark = pytest.mark.timeout(180)

# a measured row: "| name | 1,234.5 | ..." (a skipped row has text where the number would be)
_MEASURED = r"^\| {name} \| [\d,]+\.\d \|"


def _nginx_available() -> bool:
    return bool(
        os.environ.get("NGINX") or shutil.which("nginx") or Path("/usr/sbin/nginx").exists()
    )


def _run_harness(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the harness; on timeout send SIGTERM, which it turns into a clean shutdown that stops
    every server it started (they run in their own sessions, so killing it would orphan them)."""
    proc = subprocess.Popen(
        [sys.executable, str(RUN_PY), *args],
        cwd=str(REPO_ROOT),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"benchmark did not finish in {timeout:g} s\nstderr:\n{stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_quick_overhead_run(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    result = _run_harness(
        ["--quick", "--scenario", "overhead", "--json", str(out_json)], timeout=150
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    table = result.stdout
    assert "### Overhead per call" in table

    expected = ["raw httpx (sync)", "raw httpx (async)", "meshlib (sync)", "meshlib (async)"]
    if _nginx_available():
        expected.append("nginx hop (sync)")
    for name in expected:
        pattern = _MEASURED.format(name=re.escape(name))
        assert re.search(pattern, table, re.MULTILINE), f"no measured row {name!r} in:\n{table}"

    rows = {row["variant"]: row for row in json.loads(out_json.read_text())["overhead"]["rows"]}
    for name in expected:
        assert rows[name]["calls"] > 0
        assert rows[name]["errors"] == 0, rows[name]


def test_quick_overflow_run(tmp_path: Path) -> None:
    """The overflow scenario (the refused call's latency, moved out of tests/e2e/test_limits.py):
    every timed call was refused locally and none of them reached the backend."""
    out_json = tmp_path / "bench.json"
    result = _run_harness(
        ["--quick", "--scenario", "overflow", "--json", str(out_json)], timeout=120
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "### Connection-pool overflow: a refused call" in result.stdout
    rows = {row["variant"]: row for row in json.loads(out_json.read_text())["overflow"]["rows"]}
    assert set(rows) == {"meshlib (sync)", "meshlib (async)"}
    for name, row in rows.items():
        assert row["refused"] > 0, row
        assert row["other_outcomes"] == {}, (name, row)
        assert row["backend_requests"] == 2, row  # the two held calls (--quick: 2 rounds), only
        measured = rf"^\| {re.escape(name)} \| \d+ \| [\d,]+\.\d / "
        assert re.search(measured, result.stdout, re.MULTILINE), result.stdout
