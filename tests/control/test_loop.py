"""The control plane's background loop: coroutines run on it from other threads, and one
stop cancels every task — waking every sleep at once — then joins its thread, bounded."""

from __future__ import annotations

import asyncio
import threading

import pytest

from meshlib.control.loop import LoopThread

pytestmark = pytest.mark.timeout(10)


def test_submit_runs_on_the_loop_thread_and_stop_wakes_every_sleep_at_once() -> None:
    runner = LoopThread("test-loop").start()
    woken: list[str] = []
    sleeping = threading.Event()
    count = 0

    async def long_sleep(name: str) -> None:
        nonlocal count
        count += 1
        if count == 3:
            sleeping.set()
        try:
            await asyncio.sleep(3600)  # an hour: only the stop can end it within the timeout
        except asyncio.CancelledError:
            woken.append(name)
            raise

    async def where() -> str:
        return threading.current_thread().name

    assert runner.submit(where()).result(5) == "test-loop"
    futures = [runner.submit(long_sleep(f"task-{i}")) for i in range(3)]
    assert sleeping.wait(5)
    runner.stop(timeout=5)
    assert sorted(woken) == ["task-0", "task-1", "task-2"]
    assert all(f.cancelled() for f in futures)
    assert not runner.running
    assert not any(t.name == "test-loop" for t in threading.enumerate())
    runner.stop()  # twice: nothing to do


def test_a_stopped_or_unstarted_loop_refuses_work_naming_itself() -> None:
    runner = LoopThread("test-idle")

    async def nothing() -> None:
        return None

    with pytest.raises(RuntimeError, match="test-idle: the loop is not running"):
        runner.submit(nothing())
    runner.start().stop()
    with pytest.raises(RuntimeError, match="test-idle: the loop is not running"):
        runner.submit(nothing())
