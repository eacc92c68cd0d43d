"""Smoke test of the inbound benchmark: ``benchmarks/inbound.py --quick``.

Runs the benchmark as CI would (a subprocess on loopback, ~10 s) and checks it exits 0 and prints
measured server-CPU rows for bare uvicorn and MeshMiddleware, the throughput rows when wrk exists
(else the "skipped" notice), the nginx row when nginx exists (else "skipped"), and the TLS table.
The numbers themselves are not checked: a quick run is far too short to mean anything.
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
INBOUND_PY = REPO_ROOT / "benchmarks" / "inbound.py"

pytestmark = pytest.mark.timeout(180)

# a measured row: "| name | 1,234.5 ..." (a skipped row has text where the number would be)
_MEASURED = r"^\| {name} \| [\d,]+(\.\d)? "


def _nginx_available() -> bool:
    return bool(
        os.environ.get("NGINX") or shutil.which("nginx") or Path("/usr/sbin/nginx").exists()
    )


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the benchmark; on timeout send SIGTERM, which it turns into a clean shutdown that
    stops every server it started (they run in their own sessions)."""
    proc = subprocess.Popen(
        [sys.executable, str(INBOUND_PY), *args],
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


def _has_row(text: str, name: str) -> bool:
    return re.search(_MEASURED.format(name=re.escape(name)), text, re.MULTILINE) is not None


def test_quick_inbound_run(tmp_path: Path) -> None:
    out_json = tmp_path / "inbound.json"
    result = _run(["--quick", "--json", str(out_json)], timeout=150)
    assert result.returncode == 0, result.stderr
    text = result.stdout

    cpu_section = text.split("### Server CPU per request", 1)[1].split("### Throughput", 1)[0]
    assert _has_row(cpu_section, "bare uvicorn"), text
    assert _has_row(cpu_section, "MeshMiddleware"), text
    assert _has_row(cpu_section, "naive span+2 metrics"), text

    load_section = text.split("### Throughput", 1)[1].split("### mTLS", 1)[0]
    if shutil.which("wrk"):
        assert _has_row(load_section, "bare uvicorn"), text
        assert _has_row(load_section, "MeshMiddleware"), text
    else:
        assert "skipped" in load_section, text

    if _nginx_available():
        assert _has_row(cpu_section, "nginx -> bare uvicorn"), text
    else:
        assert "skipped" in cpu_section, text

    assert "### mTLS" in text and "reload_svid()" in text, text
    assert "### Verdicts" in text, text

    data = json.loads(out_json.read_text())
    variants = {row["variant"] for row in data["cpu"]}
    assert {"bare uvicorn", "MeshMiddleware"} <= variants
    assert all(row["errors"] == 0 for row in data["cpu"])
    assert data["tls"]["rotations_served_new_cert"] == data["tls"]["rotations"]
