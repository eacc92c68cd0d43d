"""Child processes for the multi-process registry tests: each in its own process group (signalled
as a group, all stopped at teardown), its stdout lines queued; and mesh traffic from the test
process (:class:`Traffic`), recording every call so a test can count the failed ones.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import meshlib


@dataclass
class Child:
    """A process in its own group (signalled as a group), its stdout lines queued."""

    popen: subprocess.Popen[bytes]
    log: Path
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def read(self, stdout: IO[bytes]) -> None:
        for raw in stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))

    def line(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                line = self.lines.get(timeout=min(left, 0.5))
                if line.startswith(prefix):
                    return line
            assert self.popen.poll() is None, f"exited {self.popen.returncode} before {prefix!r}"
        raise AssertionError(f"no line {prefix!r} within {timeout}s")

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the group and wait for the process to end."""
        self.signal(signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


class Processes:
    """``start(name, argv, env)``: a child process, stderr to ``DIR/name.log``; :meth:`stop`
    ends every one (SIGTERM to its group, SIGKILL after 10 s) and checks nothing outlived it."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=out,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        assert popen.stdout is not None
        child = Child(popen, log)
        threading.Thread(target=child.read, args=(popen.stdout,), daemon=True).start()
        self.children.append(child)
        return child

    def stop(self) -> None:
        for child in self.children:
            child.signal(signal.SIGCONT)  # a stopped group would not see SIGTERM
            child.signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.signal(signal.SIGKILL)
                child.popen.wait(timeout=10)
        for child in self.children:
            try:
                os.killpg(child.popen.pid, 0)
            except ProcessLookupError:
                continue  # the group is empty: nothing outlived the test
            raise AssertionError(f"process group {child.popen.pid} outlived its test")


def until(predicate: Callable[[], bool], timeout: float) -> bool:
    """A condition other processes make true, polled, bounded (no event crosses a process)."""
    idle = threading.Event()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        idle.wait(0.02)
    return True


@dataclass(frozen=True)
class Call:
    wall: float  # when the answer came (wall clock: the registry stamps versions with it)
    ok: bool
    service: str = ""
    instance: str = ""
    error: str = ""


class Traffic:
    """GETs to ``url`` (a productpage answering ``{"reviews": {"service", "instance"}}``)
    from a few threads until stopped."""

    def __init__(
        self, mesh: meshlib.Mesh, workers: int = 3, url: str = "http://productpage/productpage"
    ) -> None:
        self.calls: list[Call] = []
        self._mesh = mesh
        self._url = url
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(workers)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        with self._mesh.client(timeout=5.0) as client:
            while not self._stop.is_set():
                try:
                    answer = client.get(self._url)
                    if answer.status_code == 200:
                        body = answer.json()["reviews"]
                        call = Call(time.time(), True, body["service"], body["instance"])
                    else:
                        call = Call(time.time(), False, error=f"{answer.status_code} {answer.text}")
                except Exception as exc:  # a failed call is what the tests count
                    call = Call(time.time(), False, error=f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.calls.append(call)
                self._stop.wait(0.02)  # pacing, so a few threads do not saturate two cores

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def count(self) -> int:
        with self._lock:
            return len(self.calls)

    def failed(self) -> list[str]:
        return [c.error for c in self.snapshot() if not c.ok]

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
