"""Smoke test of benchmarks/balancer_share.py: it runs, prints its table, and meshlib's score
keeps the slow endpoint's share below Finagle's in the jittery 20/200 ms cell."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "balancer_share.py"


def test_balancer_share_prints_both_scores(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("balancer_share", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["balancer_share"] = module
    try:
        spec.loader.exec_module(module)
        assert module.main(["--calls", "4000", "--seeds", "1"]) == 0
    finally:
        del sys.modules["balancer_share"]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2")]
    assert len(rows) == 8, rows
    cells = next(r for r in rows if r.startswith("| 20/200 | 0.35 |")).strip("| ").split(" | ")
    finagle, meshlib = (float(c.split("-")[0].rstrip("%")) for c in cells[2:])
    assert meshlib < finagle, cells
