"""Fixtures for the pure policy core tests: no sockets, no sleeps, a clock that tests move."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

import meshlib
from policy.fakes import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mesh_for(clock: FakeClock) -> Iterator[Callable[[str], meshlib.Mesh]]:
    made: list[meshlib.Mesh] = []

    def make(text: str) -> meshlib.Mesh:
        mesh = meshlib.Mesh.from_text(
            text, service="productpage", clock=clock, seed=1, metrics=False, watch=False
        )
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()
