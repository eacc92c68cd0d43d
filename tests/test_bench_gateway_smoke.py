"""Smoke test of the ingress gateway benchmark: ``benchmarks/gateway.py --quick``.

Runs the benchmark as CI would (a subprocess on loopback, ~15 s) and checks it exits 0 and prints
measured rows for the direct path and the gateway's plain and TLS listeners, the nginx rows and
the gateway/nginx comparison when an nginx binary exists (else without them), and the throughput
columns when wrk exists (else "skipped"). The numbers themselves are not checked: a quick run is
far too short to mean anything.
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
GATEWAY_PY = REPO_ROOT / "benchmarks" / "gateway.py"

pytestmark = pytest.mark.timeout(150)

# a measured row: "| name | 1,234.5 | ..." (a skipped row has text where the number would be)
_MEASURED = r"^\| {name} \| [\d,]+\.\d \|"


def _nginx_available() -> bool:
    return bool(
        os.environ.get("NGINX") or shutil.which("nginx") or Path("/usr/sbin/nginx").exists()
    )


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the benchmark; on timeout send SIGTERM, which it turns into a clean shutdown that
    stops every process it started (they run in their own sessions)."""
    proc = subprocess.Popen(
        [sys.executable, str(GATEWAY_PY), *args],
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
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"benchmark did not finish in {timeout:g} s\nstderr:\n{stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_quick_gateway_run(tmp_path: Path) -> None:
    out_json = tmp_path / "gateway.json"
    result = _run(["--quick", "--json", str(out_json)], timeout=120)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    text = result.stdout

    expected = ["direct", "gateway (plain)", "gateway (TLS)"]
    nginx_rows = ["nginx (plain)", "nginx (TLS)"]
    if _nginx_available():
        expected += nginx_rows
        assert re.search(r"^\| plain \| [\d.]+× \|", text, re.MULTILINE), text
        assert re.search(r"^\| TLS \| [\d.]+× \|", text, re.MULTILINE), text
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
