"""Smoke test of ``benchmarks/harness_start.py``: one short round runs, every server answered
(the round raises otherwise) and both steps are reported. The numbers are not checked."""

from __future__ import annotations

import re

import pytest

from benchmarks import harness_start

pytestmark = pytest.mark.timeout(60)


def test_start_and_stop_are_measured_and_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert harness_start.main(["--servers", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for step in ("start", "stop"):
        assert re.search(rf"^\| {step} \| \d+\.\d\d \| \d+\.\d\d \| \d+\.\d\d \|$", out, re.M), out


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        harness_start.main(["--servers", "0"])
