"""Smoke test of ``benchmarks/endpoint_churn.py --quick``: both policy sizes are measured, each
update reaches the destination (checked inside the script). The numbers are not checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import endpoint_churn

pytestmark = pytest.mark.timeout(60)


def test_quick_run_reports_both_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "churn.json"
    assert endpoint_churn.main(["--quick", "--rounds", "1", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| ([\d,]+) \| ([\d.]+) µs \| — \|$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["10", "1,000"], out
    figures = json.loads(out_json.read_text())
    assert set(figures["us_per_update"]) == {"10", "1000"}
    assert figures["ratio"] > 0
