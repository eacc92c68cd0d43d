"""Smoke test of ``benchmarks/registry.py``: the quickest run starts a real registry process,
measures all four figures and reports them in one table (the numbers are not checked, only
that each was measured), and stops the registry it started."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from benchmarks import registry

pytestmark = pytest.mark.timeout(60)

NUMBER = r"\d+(?:\.\d+)?"
#: A figure with the idle floor taken off: noise can put it just below zero, and it is still
#: a measurement.
SIGNED = rf"-?{NUMBER}"


def test_quick_run_reports_every_figure(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cores = os.sched_getaffinity(0)
    out_json = tmp_path / "registry.json"
    assert registry.main(["--quick", "--json", str(out_json)]) == 0
    assert os.sched_getaffinity(0) == cores  # the benchmark gave the test its cores back
    out = capsys.readouterr().out
    rows = {
        "registrations/s": rf"\| registrations/s \(4 clients, 40 instances\) \| {NUMBER} \|",
        "register propagation": rf"\| propagation of a register to all 10 watchers, p50 / p99 / "
        rf"max \(ms, 3 reps\) \| {NUMBER} / {NUMBER} / {NUMBER} \| p99 <= 250 ms: (met|MISSED) \|",
        "apply propagation": rf"\| propagation of PUT /v1/policy to all 10 watchers, .* \| "
        rf"{NUMBER} / {NUMBER} / {NUMBER} \|",
        "wake-ups": rf"\| watchers answered per change \(10 over 5 services, 2 changes; max\) \| "
        rf"{NUMBER} \(\d+\) \| only that service's 2: (met|MISSED) \|",
        "global index": rf"\| \.\.\. with one global index .* \| {NUMBER} \|",
        "heartbeat CPU": rf"\| registry CPU, 20 instances beating every 0.5 s .* \| {NUMBER} \| "
        r"<= 5 %: (met|MISSED|not judged: \d+ of \d+ beats/s delivered) \|",
        "ratios": r"^Ratios: one global index answers \d+x",
    }
    for name, pattern in rows.items():
        assert re.search(pattern, out, re.M), f"{name} row missing:\n{out}"
    data = json.loads(out_json.read_text())
    assert set(data) >= {"registrations", "propagation", "wakeups", "heartbeats", "machine"}
    assert data["propagation"]["register"]["repetitions"] == 3
    assert data["heartbeats"]["failures"] == 0


def test_only_runs_the_parts_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    assert registry.main(["--quick", "--only", "heartbeats"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"\| registry CPU per heartbeat \(ms, idle removed\) \| {SIGNED} \|", out)
    assert "registrations/s" not in out and "propagation" not in out
    assert re.search(r"^Ratios: heartbeat CPU is [\d.]+x its target\.$", out, re.M)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        registry.main(["--watchers", "0"])


def test_cpu_seconds_counts_finer_than_a_clock_tick() -> None:
    # /proc/PID/stat counts in 10 ms ticks: 3 ms of CPU would read as 0 or 10 ms there
    before, started = registry.cpu_seconds(os.getpid()), time.process_time()
    while time.process_time() - started < 0.003:
        pass
    spent = registry.cpu_seconds(os.getpid()) - before
    assert 0.003 <= spent < 0.009
