"""Waiting on what another thread or process makes true, for the registry tests: a bounded
condition check (not a sleep as synchronisation), and a mesh's discovered endpoint addresses."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import meshlib


def until(
    predicate: Callable[[], bool], timeout: float = 15.0, step: Callable[[], Any] | None = None
) -> bool:
    """True once ``predicate()`` is, False after ``timeout`` s; ``step`` (a call) runs between
    checks instead of an idle wait, so traffic flows for the whole window."""
    idle = threading.Event()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        if step is None:
            idle.wait(0.02)
        else:
            step()
    return True


def endpoints_of(mesh: meshlib.Mesh, key: str = "reviews.default") -> set[str]:
    """The addresses ``mesh`` discovered for the service ``key`` (``name.namespace``)."""
    found = mesh.discovered().get(key)
    return set() if found is None else {e.address for e in found.endpoints}
