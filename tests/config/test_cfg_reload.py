"""Hot reload of bad input through a real file (issue 8, items 1 and 2): an empty, ``---``-only
or comment-only file, and each input that used to raise another exception, is rejected with a
ConfigError naming the file, and the last good snapshot stays in force — through an explicit
``reload()`` and through the file watcher, with real calls to a real server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.config.loader import INTERNAL_ERROR, NO_DOCUMENTS

pytestmark = pytest.mark.timeout(30)

POLL = 0.05  # the watcher's poll interval; a change applies once stable for one interval
HUGE = "9" * 400


def policy(port: int) -> str:
    return (
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\n"
        f"spec:\n  endpoints:\n  - address: '127.0.0.1:{port}'\n"
    )


def traffic_policy(spec: str) -> str:
    return (
        f"---\napiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {{name: p}}\nspec: {spec}\n"
    )


EMPTY = {"empty": "", "only ---": "---\n", "only comments": "# policy moved\n# elsewhere\n"}

#: Appended to a good policy: each used to escape as another exception (issue 8, item 1).
BAD_TAILS = {
    "duration": traffic_policy(f"{{target: {{service: reviews}}, timeout: '{HUGE}s'}}"),
    "rate .inf": traffic_policy("{rateLimit: {requestsPerSecond: .inf}}"),
    "ratio 400 digits": traffic_policy(f"{{retries: {{budget: {{ratio: {HUGE}}}}}}}"),
    "apiVersion map": "---\napiVersion: {v: 1}\nkind: Service\nmetadata: {name: x}\n",
    "labels 5": "---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {name: y}\n"
    "spec: {endpoints: [{address: 'h:1', labels: 5}]}\n",
    "jwks nesting": "---\napiVersion: meshlib/v1\nkind: RequestAuthentication\n"
    f"metadata: {{name: j}}\nspec: {{jwtRules: [{{issuer: i, jwks: '{'[' * 100_000}'}}]}}\n",
}


def rejected(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("mesh_config_reloads_total", {"result": "rejected"}) or 0.0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.mark.parametrize("text", [*EMPTY.values(), *BAD_TAILS.values()], ids=[*EMPTY, *BAD_TAILS])
def test_explicit_reload_keeps_the_last_good_snapshot(tmp_path: Path, text: str) -> None:
    path = tmp_path / "mesh.yaml"
    good = policy(9080)
    path.write_text(good)
    registry = CollectorRegistry()
    with meshlib.Mesh.from_file(path, service="t", watch=False, registry=registry) as mesh:
        before = mesh.snapshot
        path.write_text(text if text in EMPTY.values() else good + text)
        assert mesh.reload() is False
        assert mesh.snapshot is before and "reviews.default" in mesh.snapshot.services
        error = mesh.last_error
        assert error is not None and error.problems
        assert {p.file for p in error.problems} == {str(path)}
        assert all(p.line >= 1 and INTERNAL_ERROR not in p.message for p in error.problems)
        assert f"{path}:{error.problems[0].line}" in str(error)
        if text in EMPTY.values():
            assert [p.message for p in error.problems] == [NO_DOCUMENTS]
        else:
            assert all(p.field for p in error.problems)
        assert rejected(registry) == 1


@pytest.mark.parametrize("text", EMPTY.values(), ids=list(EMPTY))
def test_watcher_refuses_an_emptied_file_and_calls_keep_working(
    tmp_path: Path, echo_factory: Callable[..., object], text: str
) -> None:
    backend = echo_factory("v1")
    path = tmp_path / "mesh.yaml"
    good = policy(backend.port)  # type: ignore[attr-defined]
    path.write_text(good)
    registry = CollectorRegistry()
    with (
        meshlib.Mesh.from_file(path, service="t", poll_interval=POLL, registry=registry) as mesh,
        mesh.client() as client,
    ):
        version = mesh.snapshot.version
        assert client.get("http://reviews/r").status_code == 200

        with open(path, "w") as f:  # truncated in place, as a crashed or half-done write leaves it
            f.write(text)
        wait_for(lambda: rejected(registry) >= 1, "the emptied file to be rejected")
        assert mesh.snapshot.version == version
        assert mesh.reload_status.ok is False
        assert mesh.last_error is not None
        assert [(p.file, p.message) for p in mesh.last_error.problems] == [
            (str(path), NO_DOCUMENTS)
        ]
        response = client.get("http://reviews/r")  # the declared service is still known
        assert response.status_code == 200
        assert response.extensions["mesh_decision"].snapshot_version == version

        replace_file(path, good + "# back\n")
        wait_for(lambda: mesh.snapshot.version != version, "the good file to apply")
        assert mesh.reload_status.ok is True
        assert client.get("http://reviews/r").status_code == 200
