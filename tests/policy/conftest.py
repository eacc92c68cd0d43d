"""Fixtures for the pure policy core tests: no sockets, no sleeps, a clock that tests move."""

from __future__ import annotations

import pytest

from policy.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
