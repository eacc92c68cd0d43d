"""Hot reload of a watched policy file: good changes apply, bad ones keep the last good snapshot
(CFG-1), torn writes are never applied (CFG-2), and reloads under load break no call (LOAD-5).

Every test runs through both drivers (``caller``). The mesh polls its file every 50 ms and
reloads once the file's stat has been stable for one interval; tests wait for a reload with a
bounded poll of ``mesh.snapshot.version`` / the reload metric, never a fixed sleep.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import meshlib

pytestmark = pytest.mark.timeout(60)

POLL = 0.05  # the mesh's poll interval; a change is read after it is stable for one interval
WAIT = 5.0  # upper bound for any reload to be noticed


def policy(
    v1: int,
    v2: int,
    *,
    w1: int = 100,
    w2: int = 0,
    timeout: str = "2s",
    retries: str | None = None,
) -> str:
    """reviews (root, no endpoints) split between reviews-v1 and reviews-v2."""
    retry_block = f"  retries: {retries}\n" if retries else ""
    return f"""\
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews, namespace: default}}
spec: {{}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews-v1, namespace: default}}
spec:
  endpoints:
  - address: "127.0.0.1:{v1}"
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews-v2, namespace: default}}
spec:
  endpoints:
  - address: "127.0.0.1:{v2}"
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {{name: reviews-split, namespace: default}}
spec:
  service: reviews
  backends:
  - service: reviews-v1
    weight: {w1}
  - service: reviews-v2
    weight: {w2}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: reviews-policy, namespace: default}}
spec:
  target: {{service: reviews}}
  timeout: {timeout}
{retry_block}"""


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def replace_file(path: Path, text: str) -> None:
    """Atomic update: write a temp file beside it, then rename over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def reloads(registry: CollectorRegistry, result: str) -> float:
    value = registry.get_sample_value("mesh_config_reloads_total", {"result": result})
    return value or 0.0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``predicate`` until true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


class Watched:
    """A mesh watching a policy file in tmp_path, with every applied snapshot recorded."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        path.write_text(text)
        self.registry = CollectorRegistry()
        self.mesh = meshlib.Mesh.from_file(
            path, service="tester", seed=7, poll_interval=POLL, registry=self.registry
        )
        #: (version, digest) of the first snapshot and of every one applied since, in order.
        self.applied: list[tuple[int, str]] = [
            (self.mesh.snapshot.version, self.mesh.snapshot.digest)
        ]
        apply = self.mesh.apply

        def record(snapshot: Any) -> None:
            self.applied.append((snapshot.version, snapshot.digest))
            apply(snapshot)

        self.mesh.apply = record  # type: ignore[method-assign]

    def wait_applied(self, text: str) -> int:
        """Wait until ``text`` is the snapshot in force; return its version."""
        want = digest(text)
        wait_for(lambda: self.mesh.snapshot.digest == want, "the new policy to apply")
        return self.mesh.snapshot.version

    def wait_rejected(self, count: float) -> None:
        wait_for(lambda: reloads(self.registry, "rejected") >= count, f"{count:g} rejections")


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[Callable[[str], Watched]]:
    made: list[Watched] = []

    def make(text: str) -> Watched:
        w = Watched(tmp_path / "mesh.yaml", text)
        made.append(w)
        return w

    yield make
    for w in made:
        w.mesh.close()


def backend_of(response: httpx.Response) -> str:
    return str(response.headers["x-backend"])


# --- a good change applies -------------------------------------------------------------------


def test_good_change_applies(caller, echo_factory, watched) -> None:
    v1, v2 = echo_factory("v1"), echo_factory("v2")
    w = watched(policy(v1.port, v2.port, w1=100, w2=0))
    c = caller.bind(w.mesh)
    first = w.mesh.snapshot.version
    assert {backend_of(c.get("http://reviews/r")) for _ in range(10)} == {"v1"}

    flipped = policy(v1.port, v2.port, w1=0, w2=100)
    w.path.write_text(flipped)  # in place (not atomic): the watcher waits for it to settle
    wait_for(lambda: w.mesh.snapshot.version != first, "snapshot version to change")
    assert w.mesh.snapshot.digest == digest(flipped)
    assert w.mesh.reload_status.ok is True
    assert reloads(w.registry, "applied") == 1

    responses = [c.get("http://reviews/r") for _ in range(20)]
    assert {backend_of(r) for r in responses} == {"v2"}
    assert {r.extensions["mesh_decision"].snapshot_version for r in responses} == {
        w.mesh.snapshot.version
    }
    assert v2.requests == 20


# --- CFG-1: a bad file keeps the last good snapshot --------------------------------------------


def _line_of(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in text")


def bad_variants(good: str) -> list[tuple[str, str, int, int]]:
    """(label, text, lo, hi) for broken versions of ``good``: the error must name a line in
    lo..hi (YAML scanners report some mistakes on the line where they notice them)."""
    tab = good.replace("    weight: 100", "\tweight: 100")
    indent = good.replace("  - service: reviews-v1", "   - service: reviews-v1")
    v1_line = next(line for line in good.splitlines() if 'address: "127.0.0.1:' in line)
    quote = good.replace(v1_line, v1_line.rstrip('"'), 1)
    negative = good.replace("weight: 100", "weight: -5")
    tab_at = _line_of(tab, "\t")
    indent_at = _line_of(indent, "   - service: reviews-v1")
    quote_at = _line_of(quote, v1_line.rstrip('"'))
    negative_at = _line_of(negative, "weight: -5")
    return [
        ("tab", tab, tab_at, tab_at),
        ("indentation", indent, indent_at, indent_at + 1),
        ("unclosed quote", quote, quote_at, quote_at + 2),
        ("negative weight", negative, negative_at, negative_at),
    ]


def test_bad_files_keep_last_good_then_valid_applies(caller, echo_factory, watched) -> None:
    v1, v2 = echo_factory("v1"), echo_factory("v2")
    good = policy(v1.port, v2.port, w1=100, w2=0)
    w = watched(good)
    c = caller.bind(w.mesh)
    version = w.mesh.snapshot.version

    for count, (label, text, lo, hi) in enumerate(bad_variants(good), start=1):
        with pytest.raises(meshlib.ConfigError):  # precondition: the variant really is bad
            meshlib.Mesh.from_text(text, service="t", metrics=False)
        replace_file(w.path, text)
        w.wait_rejected(count)
        status = w.mesh.reload_status
        assert status.ok is False, label
        assert status.version == version, label
        assert status.digest == digest(text), label  # which content was rejected
        error = w.mesh.last_error
        assert error is not None and error.problems, label
        assert {p.file for p in error.problems} == {str(w.path)}, label
        lines = [p.line for p in error.problems]
        assert any(lo <= n <= hi for n in lines), (label, str(error))
        assert f"{w.path}:{lines[0]}" in str(error), label
        # the last good snapshot is still in force: traffic unchanged
        assert w.mesh.snapshot.version == version, label
        assert w.mesh.snapshot.digest == digest(good), label
        r = c.get("http://reviews/r")
        assert backend_of(r) == "v1", label
        assert r.extensions["mesh_decision"].snapshot_version == version, label

    assert reloads(w.registry, "rejected") == len(bad_variants(good))
    assert reloads(w.registry, "applied") == 0
    assert w.applied == [(version, digest(good))]  # nothing was applied

    fixed = policy(v1.port, v2.port, w1=0, w2=100)
    replace_file(w.path, fixed)
    new_version = w.wait_applied(fixed)
    assert new_version != version
    assert w.mesh.reload_status.ok is True
    assert w.mesh.last_error is None
    assert reloads(w.registry, "applied") == 1
    assert {backend_of(c.get("http://reviews/r")) for _ in range(10)} == {"v2"}


def test_explicit_reload_returns_false_on_bad_file(caller, echo_factory, tmp_path) -> None:
    v1, v2 = echo_factory("v1"), echo_factory("v2")
    path = tmp_path / "mesh.yaml"
    good = policy(v1.port, v2.port)
    path.write_text(good)
    registry = CollectorRegistry()
    with meshlib.Mesh.from_file(
        path, service="tester", seed=7, watch=False, registry=registry
    ) as mesh:
        c = caller.bind(mesh)
        version = mesh.snapshot.version
        assert mesh.reload() is True  # unchanged content: nothing to do, still fine
        assert mesh.snapshot.version == version

        path.write_text(good.replace("weight: 100", "weight: -1"))
        assert mesh.reload() is False
        assert mesh.reload_status.ok is False
        assert mesh.last_error is not None and str(path) in str(mesh.last_error)
        assert mesh.snapshot.version == version
        assert reloads(registry, "rejected") == 1
        assert backend_of(c.get("http://reviews/r")) == "v1"

        path.write_text(good)  # back to the content in force: the error clears, no new version
        assert mesh.reload() is True
        assert mesh.reload_status.ok is True
        assert mesh.last_error is None
        assert mesh.snapshot.version == version

        path.unlink()  # a missing file is rejected the same way
        assert mesh.reload() is False
        assert reloads(registry, "rejected") == 2

        path.write_text(policy(v1.port, v2.port, w1=0, w2=100))
        assert mesh.reload() is True
        assert mesh.snapshot.version != version
        assert mesh.last_error is None
        assert backend_of(c.get("http://reviews/r")) == "v2"


# --- CFG-2: torn writes are never applied; a rename applies exactly once -------------------------


def test_torn_write_is_never_applied(caller, echo_factory, watched) -> None:
    v1, v2 = echo_factory("v1"), echo_factory("v2")
    good = policy(v1.port, v2.port, w1=100, w2=0)
    w = watched(good)
    c = caller.bind(w.mesh)

    full = policy(v1.port, v2.port, w1=0, w2=100, timeout="3s")
    cut = full.index("  - service: reviews-v2")  # mid-split: the half alone is not valid
    half, rest = full[:cut], full[cut:]
    with pytest.raises(meshlib.ConfigError):
        meshlib.Mesh.from_text(half, service="t", metrics=False)

    started = time.monotonic()  # the file changes (truncated, then half) from here on
    with open(w.path, "w") as f:
        f.write(half)
        f.flush()
        time.sleep(POLL / 5)  # less than the settle time: the watcher must not read the half
        f.write(rest)
        f.flush()
        gap = time.monotonic() - started
    w.wait_applied(full)

    digests = [d for _, d in w.applied]
    assert digests == [digest(good), digest(full)]  # only complete files, each once
    assert digest(half) not in digests
    assert reloads(w.registry, "applied") == 1
    if gap < POLL:  # the write finished within one settle interval: debounced, not even read
        assert reloads(w.registry, "rejected") == 0
        assert w.mesh.reload_status.ok is True
    assert backend_of(c.get("http://reviews/r")) == "v2"


def test_slow_torn_write_is_rejected_not_applied(caller, echo_factory, watched) -> None:
    """A writer pausing longer than the settle time exposes the half file: it is read and
    rejected (never applied), and the completed file then applies."""
    v1, v2 = echo_factory("v1"), echo_factory("v2")
    good = policy(v1.port, v2.port, w1=100, w2=0)
    w = watched(good)
    c = caller.bind(w.mesh)
    full = policy(v1.port, v2.port, w1=0, w2=100, timeout="3s")
    cut = full.index("  - service: reviews-v2")
    with open(w.path, "w") as f:
        f.write(full[:cut])
        f.flush()
        w.wait_rejected(1)  # the half was read and refused (RELIABILITY: 200 ms gap)
        assert backend_of(c.get("http://reviews/r")) == "v1"
        f.write(full[cut:])
    w.wait_applied(full)
    assert [d for _, d in w.applied] == [digest(good), digest(full)]
    assert w.mesh.reload_status.ok is True
    assert backend_of(c.get("http://reviews/r")) == "v2"


def test_rename_applies_exactly_once(caller, echo_factory, watched) -> None:
    v1, v2 = echo_factory("v1"), echo_factory("v2")
    good = policy(v1.port, v2.port, w1=100, w2=0)
    w = watched(good)
    c = caller.bind(w.mesh)

    second = policy(v1.port, v2.port, w1=0, w2=100)
    replace_file(w.path, second)
    v_second = w.wait_applied(second)
    # A later, different file proves the watcher moved on; the rename in between applied once.
    third = policy(v1.port, v2.port, w1=0, w2=100, timeout="5s")
    replace_file(w.path, third)
    v_third = w.wait_applied(third)

    assert w.applied == [
        (w.applied[0][0], digest(good)),
        (v_second, digest(second)),
        (v_third, digest(third)),
    ]
    assert w.applied[0][0] < v_second < v_third
    assert reloads(w.registry, "applied") == 2
    assert reloads(w.registry, "rejected") == 0
    assert c.get("http://reviews/r").extensions["mesh_decision"].deadline == 5.0


# --- LOAD-5: hot reload under load ----------------------------------------------------------


def test_reload_under_load(caller, echo_factory, watched) -> None:
    v1, v2 = echo_factory("v1"), echo_factory("v2")
    texts = [
        policy(
            v1.port,
            v2.port,
            w1=100 if i % 2 == 0 else 0,
            w2=0 if i % 2 == 0 else 100,
            timeout=f"{2000 + 100 * i}ms",
            retries="{attempts: 2, retryOn: [5xx, reset]}" if i % 3 == 0 else None,
        )
        for i in range(21)  # the initial file, then 20 edits
    ]
    expected = {
        digest(t): ("reviews-v1.default" if i % 2 == 0 else "reviews-v2.default")
        for i, t in enumerate(texts)
    }
    timeouts = {digest(t): 2.0 + 0.1 * i for i, t in enumerate(texts)}
    w = watched(texts[0])
    c = caller.bind(w.mesh)

    results: list[httpx.Response | Exception] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            results.append(c.outcome("GET", "http://reviews/r"))

    workers = [threading.Thread(target=load, name=f"load-{i}") for i in range(3)]
    for t in workers:
        t.start()
    try:
        started = time.monotonic()
        for text in texts[1:]:  # 20 edits, each applied before the next (~0.1-0.15 s each)
            replace_file(w.path, text)
            w.wait_applied(text)
        edit_seconds = time.monotonic() - started
        during = len(results)
    finally:
        stop.set()
        for t in workers:
            t.join(timeout=10)
    assert edit_seconds < 10
    assert during >= 50, "too little traffic overlapped the edits to mean anything"

    failures = [r for r in results if isinstance(r, Exception) or r.status_code != 200]
    assert failures == []
    assert [d for _, d in w.applied] == [digest(t) for t in texts]
    versions = {v: d for v, d in w.applied}
    seen: set[int] = set()
    for r in results:
        assert isinstance(r, httpx.Response)
        decision = r.extensions["mesh_decision"]
        assert decision.snapshot_version in versions
        seen.add(decision.snapshot_version)
        snapshot_digest = versions[decision.snapshot_version]
        # split, timeout and the backend actually reached all agree with that one snapshot
        assert decision.backend == expected[snapshot_digest]
        assert decision.deadline == pytest.approx(timeouts[snapshot_digest])
        assert backend_of(r) == decision.backend.split("-")[1].split(".")[0]
    assert len(seen) >= 5  # traffic really ran under many snapshots


def test_call_in_flight_keeps_its_snapshot(caller, echo_factory, watched) -> None:
    v1, v2 = echo_factory("v1"), echo_factory("v2")
    old_text = policy(v1.port, v2.port, w1=100, w2=0, retries="{attempts: 2, retryOn: [5xx]}")
    new_text = policy(v1.port, v2.port, w1=0, w2=100)  # no retries, everything to v2
    w = watched(old_text)
    c = caller.bind(w.mesh)
    old = w.mesh.snapshot.version

    # The first attempt is slow and fails: its retry happens after the swap.
    v1.set_delay(0.5, times=1)
    v1.set_status(503, times=1)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(c.get, "http://reviews/r")
        assert v1.wait_for_requests(1)
        replace_file(w.path, new_text)
        new = w.wait_applied(new_text)
        assert not future.done(), "the swap must happen while the call is in flight"
        r = future.result(timeout=10)

    decision = r.extensions["mesh_decision"]
    assert r.status_code == 200
    assert decision.snapshot_version == old != new
    assert decision.backend == "reviews-v1.default"
    assert decision.retries == 1  # the old snapshot's retry policy, not the new one's
    assert [a.status for a in decision.attempts] == [503, 200]
    assert v1.requests == 2 and v2.requests == 0

    after = c.get("http://reviews/r").extensions["mesh_decision"]
    assert after.snapshot_version == new
    assert after.backend == "reviews-v2.default"
