"""Smoke test of ``benchmarks/hotpath.py`` without valgrind (a callgrind run takes minutes):
the client part of every variant runs natively against ``benchmarks/server.py`` and gets its
answers, and the table is computed from given counts. The counts themselves are not checked."""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import run as bench

ROOT = Path(__file__).resolve().parent.parent
_SPEC = importlib.util.spec_from_file_location("hotpath", ROOT / "benchmarks" / "hotpath.py")
assert _SPEC is not None and _SPEC.loader is not None
hotpath = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(hotpath)

pytestmark = pytest.mark.timeout(120)


def test_every_client_variant_runs_natively(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        servers = bench.start_servers([(0.0, 200)] * 3, stack, tmp_path)
        ports = [server.port for server in servers]
        for variant in hotpath.VARIANTS:
            used = ports if variant in hotpath.THREE_ENDPOINTS else ports[:1]
            done = subprocess.run(
                [
                    sys.executable,
                    hotpath.__file__,
                    "--client",
                    variant,
                    "--ports",
                    ",".join(map(str, used)),
                    "--calls",
                    "3",
                    "--warmup",
                    "1",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
            assert done.returncode == 0, (variant, done.stderr)
    assert all(server.proc.poll() is not None for server in servers)


def test_table_is_relative_to_raw() -> None:
    per_call = {"raw": {"Ir": 1_000_000.0}, "mesh": {"Ir": 1_060_000.0}, "sdk": None}
    text = hotpath.table(per_call, 200)
    assert "(I(400) - I(200)) / 200" in text
    assert "| raw | 1,000,000 |  |  |" in text
    assert "| mesh | 1,060,000 | +60,000 (+6.0%) | +14.4 |" in text
    assert "| sdk | n/a | | |" in text


def test_miss_table_sums_events_and_compares_with_raw() -> None:
    names = ("Ir", "I1mr", "ILmr", "D1mr", "DLmr", "D1mw", "DLmw", "Bcm", "Bim")
    events = dict.fromkeys(names, 1.0)
    mesh = {**events, "D1mr": 11.0, "D1mw": 4.0, "Bcm": 101.0}
    text = hotpath.miss_table({"raw": events, "mesh": mesh, "sdk": None}, 200)
    assert "(M(400) - M(200)) / 200" in text
    assert "| raw | 1 | 2 | 3 | 2 |" in text
    assert "| mesh | 1 (+0) | 15 (+13) | 3 (+0) | 102 (+100) |" in text
    assert "| sdk | n/a | n/a | n/a | n/a |" in text
