"""Leak checks for harness objects: stopped threads must be gone; socket counts can be compared."""

from __future__ import annotations

import os
import threading
import time

from ._loop import THREAD_PREFIX


def harness_threads() -> list[threading.Thread]:
    """Live threads started by the harness (names start with ``harness-``)."""
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]


def assert_threads_stopped(names: list[str], timeout: float = 2.0) -> None:
    """Fail if any thread named in ``names`` is still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    wanted = {n for n in names if n}
    while True:
        alive = [t.name for t in threading.enumerate() if t.name in wanted and t.is_alive()]
        if not alive:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"harness threads still alive after teardown: {alive}")
        time.sleep(0.01)


def open_socket_count() -> int:
    """Number of socket file descriptors this process holds (Linux ``/proc/self/fd``)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            continue  # closed while listing
    return count
