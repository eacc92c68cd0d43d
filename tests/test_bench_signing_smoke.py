"""Smoke test of ``benchmarks/signing.py``: the quickest run starts a real registry process,
signs renewals over mTLS, bootstraps workloads from join tokens to a first strict-mTLS call and
reports every figure in one table (the numbers are not checked, only that each was measured,
that no answer was for the wrong identity or key), and gives the test its cores back."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from benchmarks import signing

pytestmark = pytest.mark.timeout(90)

NUMBER = r"\d+(?:\.\d+)?"


def test_quick_run_reports_every_figure(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cores = os.sched_getaffinity(0)
    out_json = tmp_path / "signing.json"
    assert signing.main(["--quick", "--json", str(out_json)]) == 0
    assert os.sched_getaffinity(0) == cores
    out = capsys.readouterr().out
    rows = {
        "signs/s": r"\| renewals signed/s \(4 clients, 40 signs, mTLS connections kept, fresh "
        rf"P-256 key each\) \| {NUMBER} \|",
        "signs/s, new connections": r"\| renewals signed/s, a new mTLS connection each \(as "
        rf"`RemoteIssuer`; 4 clients, 20 signs\) \| {NUMBER} \|",
        "CPU per new-connection renewal": r"\| registry CPU per renewal on a new connection "
        rf"\(ms\) \| {NUMBER} \|",
        "CPU per sign": rf"\| registry CPU per sign \(ms\) \| {NUMBER} \|",
        "wrong answers": r"\| answers for the wrong identity or key \| 0 \|",
        "first call": rf"\| token created → first 200 over strict mTLS, p50 / p99 / max \(ms, 2 "
        rf"reps\) \| {NUMBER} / {NUMBER} / {NUMBER} \|",
        "bootstrap": rf"\| \.\.\. of which token → `from_registry` returned, p50 / p99 \(ms\) \| "
        rf"{NUMBER} / {NUMBER} \|",
        "derived": r"\| registry CPU for 1,000 workloads renewing every 12 h \(% of one core, "
        rf"DERIVED: 1,000/43200 signs/s × CPU per renewal on a new connection\) \| {NUMBER} \|",
    }
    for name, pattern in rows.items():
        assert re.search(pattern, out, re.M), f"{name} row missing:\n{out}"
    data = json.loads(out_json.read_text())
    assert set(data) >= {"renewals", "first_call", "derived", "machine", "settings"}
    assert data["renewals"]["signs"] == 40
    assert data["renewals"]["fresh_signs"] == 20
    assert data["first_call"]["repetitions"] == 2
    assert data["derived"]["signs_per_second"] == pytest.approx(1000 / 43200)


def test_only_runs_the_part_asked_for(capsys: pytest.CaptureFixture[str]) -> None:
    assert signing.main(["--quick", "--only", "renewals"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"\| registry CPU per sign \(ms\) \| {NUMBER} \|", out)
    assert "first 200" not in out


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        signing.main(["--signs", "0"])
    with pytest.raises(SystemExit):
        signing.main(["--renew-every", "0"])
