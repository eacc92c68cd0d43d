"""Smoke test of ``benchmarks/registry_app.py``: both stores and the fan-out run (each request
is checked for its status inside the benchmark) and are reported, and the persisted-beat rule
it counts is the one the app keeps (a beat every 3 s with a 10 s TTL writes every second beat
once the registrations' own writes are behind). The CPU figures are not checked."""

from __future__ import annotations

import re

import pytest

from benchmarks import registry_app

pytestmark = pytest.mark.timeout(60)


def test_every_figure_is_measured_and_reported(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--instances", "20", "--beats", "200", "--watchers", "10", "--endpoints", "5"]
    assert registry_app.main([*args, "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for store in ("memory", "sqlite"):
        found = re.search(
            rf"^heartbeat, {store} store: [\d.]+ µs .* ([\d.]+) store writes per beat$", out, re.M
        )
        assert found, out
        # 10 beats each at t = 3, 6, ... 30 after a register at 0: writes at 6, 12, ... 30
        assert float(found.group(1)) == pytest.approx(0.5, abs=0.02)  # the clock steps in floats
    assert re.search(
        r"^fan-out to 10 held queries of a service of 5 endpoints: [\d.]+ µs", out, re.M
    )
