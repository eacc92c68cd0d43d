"""Smoke test of the ingress gateway benchmark: ``benchmarks/gateway.py --quick``.

Runs the benchmark as CI would (a subprocess on loopback, ~15 s) and checks it exits 0 and prints
measured rows for the direct path and the gateway's plain and TLS listeners, the nginx rows and
the gateway/nginx comparison when an nginx binary exists (else without them), and the throughput
columns when wrk exists (else "skipped"). The numbers themselves are not checked: a quick run is
far too short to mean anything.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.benchscript import REPO_ROOT, nginx_available, run_script

GATEWAY_PY = REPO_ROOT / "benchmarks" / "gateway.py"

pytestmark = pytest.mark.timeout(150)

# a measured row: "| name | 1,234.5 | ..." (a skipped row has text where the number would be)
_MEASURED = r"^\| {name} \| [\d,]+\.\d \|"


def test_quick_gateway_run(tmp_path: Path) -> None:
    out_json = tmp_path / "gateway.json"
    result = run_script(GATEWAY_PY, ["--quick", "--json", str(out_json)], timeout=120, grace=30)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    text = result.stdout

    expected = ["direct", "gateway (plain)", "gateway (TLS)"]
    nginx_rows = ["nginx (plain)", "nginx (TLS)"]
    if nginx_available():
        expected += nginx_rows
        # the comparison rows exist; their ratio is "-" when a quick run on a loaded machine
        # measures nginx's added p50 at or below zero (seen in a CI-like run: -914 µs)
        assert re.search(r"^\| plain \| (?:-?[\d.]+×|-) \|", text, re.MULTILINE), text
        assert re.search(r"^\| TLS \| (?:-?[\d.]+×|-) \|", text, re.MULTILINE), text
    else:
        assert "nginx not found: skipped" in text, text
    for name in expected:
        pattern = _MEASURED.format(name=re.escape(name))
        assert re.search(pattern, text, re.MULTILINE), f"no measured row {name!r} in:\n{text}"
    if shutil.which("wrk") is None:
        assert "skipped" in text, text

    data = json.loads(out_json.read_text())
    rows = {row["path"]: row for row in data["rows"]}
    assert set(rows) == set(expected)
    for name in expected:
        assert rows[name]["requests"] > 0, rows[name]
        assert rows[name]["errors"] == 0, rows[name]  # every answer through every path a 200
