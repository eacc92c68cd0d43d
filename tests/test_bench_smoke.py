"""Smoke test of the benchmark harness: ``benchmarks/run.py --quick --scenario overhead`` (and
``--scenario overflow``).

Runs the harness as CI does (a subprocess on loopback, ~5-10 s) and checks it exits 0 and prints the
overhead table with measured rows for raw httpx and meshlib (and nginx, when a binary exists). The
numbers themselves are not checked: a quick run is far too short to mean anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.benchscript import REPO_ROOT, nginx_available, run_script

RUN_PY = REPO_ROOT / "benchmarks" / "run.py"

pytestmark = pytest.mark.timeout(180)

# a measured row: "| name | 1,234.5 | ..." (a skipped row has text where the number would be)
_MEASURED = r"^\| {name} \| [\d,]+\.\d \|"


def test_quick_overhead_run(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    result = run_script(
        RUN_PY, ["--quick", "--scenario", "overhead", "--json", str(out_json)], timeout=150
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    table = result.stdout
    assert "### Overhead per call" in table

    expected = ["raw httpx (sync)", "raw httpx (async)", "meshlib (sync)", "meshlib (async)"]
    if nginx_available():
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
    result = run_script(
        RUN_PY, ["--quick", "--scenario", "overflow", "--json", str(out_json)], timeout=120
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
