"""Smoke test of the inbound benchmark: ``benchmarks/inbound.py --quick``.

Runs the benchmark as CI would (a subprocess on loopback, ~10 s) and checks it exits 0 and prints
measured server-CPU rows for bare uvicorn and MeshMiddleware, the throughput rows when wrk exists
(else the "skipped" notice), the nginx row when nginx exists (else "skipped"), and the TLS table.
The numbers themselves are not checked: a quick run is far too short to mean anything.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.benchscript import REPO_ROOT, nginx_available, run_script

INBOUND_PY = REPO_ROOT / "benchmarks" / "inbound.py"

pytestmark = pytest.mark.timeout(180)

# a measured row: "| name | 1,234.5 ..." (a skipped row has text where the number would be)
_MEASURED = r"^\| {name} \| [\d,]+(\.\d)? "


def _has_row(text: str, name: str) -> bool:
    return re.search(_MEASURED.format(name=re.escape(name)), text, re.MULTILINE) is not None


def test_quick_inbound_run(tmp_path: Path) -> None:
    out_json = tmp_path / "inbound.json"
    result = run_script(INBOUND_PY, ["--quick", "--json", str(out_json)], timeout=150)
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

    if nginx_available():
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
