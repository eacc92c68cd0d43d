"""Smoke test of ``benchmarks/tracing.py --quick``: it runs and prints every row. The numbers
are not checked — a quick run is far too short to mean anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.timeout(120)


def test_quick_run_prints_every_variant() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tracing.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    for row in (
        "off (hooks bypassed)",
        "no-op provider (default)",
        "no-op + incoming traceparent",
        "SDK + BatchSpanProcessor",
        "outbound hook (trace_call)",
        "inbound hook (inbound)",
    ):
        assert f"| {row} | " in done.stdout, done.stdout
