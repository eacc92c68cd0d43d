"""What the benchmark smoke tests share: running a ``benchmarks/`` script as CI does, and whether
an nginx binary exists (its rows are measured only then)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def nginx_available() -> bool:
    return bool(
        os.environ.get("NGINX") or shutil.which("nginx") or Path("/usr/sbin/nginx").exists()
    )


def run_script(
    script: Path, args: list[str], timeout: float, grace: float = 20
) -> subprocess.CompletedProcess[str]:
    """Run ``python SCRIPT ARGS`` from the checkout; on timeout send SIGTERM, which the
    benchmark turns into a clean shutdown that stops every process it started (they run in
    their own sessions, so killing it would orphan them), kill it after ``grace`` seconds more,
    and fail the test."""
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
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
            stdout, stderr = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"benchmark did not finish in {timeout:g} s\nstderr:\n{stderr}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
