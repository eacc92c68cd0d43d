"""Smoke test of ``benchmarks/config_load.py --quick``: every figure is measured and reported
(the loader's answers are checked inside the script). The numbers themselves are not checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import config_load

pytestmark = pytest.mark.timeout(60)


def test_quick_run_reports_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "config.json"
    assert config_load.main(["--quick", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) (µs|ms|s) \|$", out, re.MULTILINE)
    assert len(rows) == len(config_load.REGEX_BOMBS) + 6, out
    figures = json.loads(out_json.read_text())
    assert set(figures["regex_us"]) == set(config_load.REGEX_BOMBS)
    assert figures["large_file_services"] > 0 and figures["large_file_bytes"] > 500_000
    many = figures["many"]
    assert many["services"] == 1_000 and many["parts"] == config_load.PARTS
    assert all(many[k] > 0 for k in ("one_file_s", "directory_s", "reload_one_file_s"))


def test_many_reports_its_anchors_beside_the_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "many.json"
    assert config_load.main(["--many", "--quick", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) (µs|ms|s) \|$", out, re.MULTILINE)
    assert [r[0].split(":")[0] for r in rows[:2]] == ["anchor", "anchor"], out
    assert len(rows) == 5, out
    anchors = json.loads(out_json.read_text())["many"]["anchors"]
    assert anchors["regex_us"] > 0 and anchors["json_10k_ms"] > 0


def test_memory_figures_are_measured_and_reported(tmp_path: Path) -> None:
    figures = config_load.memory(tmp_path, 200, 1)
    assert figures["services"] == 200
    assert 0 < figures["snapshot_bytes"] < figures["mesh_bytes"]  # the mesh holds the snapshot
    assert figures["snapshot_top"] and figures["mesh_top"] and figures["apply_s"] >= 0
    report = config_load.memory_report(figures)
    assert "B per service" in report and "Mesh.apply" in report, report
