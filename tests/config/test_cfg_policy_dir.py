"""Several policy files and directories as one watched policy (issue 15, item 4):
``Mesh.from_file`` takes a directory (its ``*.yaml``/``*.yml`` files, sorted, not recursive) or
a list of files and directories, validates them as one policy and watches every file, so a
change to any file, or a file added to or removed from a directory, reloads the whole set as one
snapshot, and a bad file keeps the last good snapshot and is named with its line.

Real files in ``tmp_path``; the watcher polls every ``POLL`` seconds and tests wait for its
reloads with a bounded poll of the reload metric or the snapshot, never a fixed sleep.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.config.loader import load_paths, policy_files
from meshlib.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

POLL = 0.05  # the watcher's poll interval; a change applies once stable for one interval


def service(name: str, port: int = 9080) -> str:
    return (
        f"apiVersion: meshlib/v1\nkind: Service\nmetadata: {{name: {name}}}\n"
        f"spec:\n  endpoints:\n  - address: '127.0.0.1:{port}'\n"
    )


def timeout_policy(target: str, timeout: str) -> str:
    """A TrafficPolicy for a service declared in another file: references cross files."""
    return (
        "apiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: t}\n"
        f"spec: {{target: {{service: {target}}}, timeout: {timeout}}}\n"
    )


def replace_file(path: Path, text: str) -> None:
    """Write beside the file (a name no directory reads) and rename over it: atomic."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def reloads(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("mesh_config_reloads_total", {"result": result}) or 0.0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def services(mesh: meshlib.Mesh) -> set[str]:
    return {key.removesuffix(".default") for key in mesh.snapshot.services}


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A directory of two policy files, and what the directory must not read."""
    directory = tmp_path / "policy.d"
    directory.mkdir()
    (directory / "10-reviews.yaml").write_text(service("reviews"))
    (directory / "20-ratings.yml").write_text(
        service("ratings") + "---\n" + timeout_policy("reviews", "2s")
    )
    (directory / "README.md").write_text(service("notyaml"))  # not a policy file name
    (directory / ".10-reviews.yaml.swp").write_text("\x00 an editor's swap file")
    (directory / "sub").mkdir()  # not recursive
    (directory / "sub" / "nested.yaml").write_text(service("nested"))
    return directory


def test_a_directory_is_its_yaml_files_sorted_not_recursive(policy_dir: Path) -> None:
    files = [str(policy_dir / "10-reviews.yaml"), str(policy_dir / "20-ratings.yml")]
    assert policy_files([policy_dir]) == files
    with meshlib.Mesh.from_file(policy_dir, service="t", watch=False, metrics=False) as mesh:
        assert mesh.snapshot.files == tuple(files)
        assert services(mesh) == {"reviews", "ratings"}
        assert mesh.snapshot.traffic_policies[0].fields["timeout"] == 2.0
    # A file named twice (alone and in its directory) is read once, in its first place.
    assert policy_files([files[1], policy_dir]) == [files[1], files[0]]


def test_several_files_and_directories_are_one_policy(policy_dir: Path, tmp_path: Path) -> None:
    extra = tmp_path / "details.yaml"
    extra.write_text(service("details"))
    paths = [str(policy_dir), extra]
    with meshlib.Mesh.from_file(paths, service="t", watch=False, metrics=False) as mesh:
        assert services(mesh) == {"reviews", "ratings", "details"}
        assert mesh.snapshot.files[-1] == str(extra)


def test_explicit_reload_reads_the_directory_listing_again(policy_dir: Path) -> None:
    with meshlib.Mesh.from_file(policy_dir, service="t", watch=False, metrics=False) as mesh:
        first = mesh.snapshot.version
        (policy_dir / "30-details.yaml").write_text(service("details"))
        assert mesh.reload() is True
        assert services(mesh) == {"reviews", "ratings", "details"}
        (policy_dir / "20-ratings.yml").unlink()
        assert mesh.reload() is True
        assert services(mesh) == {"reviews", "details"}
        assert mesh.snapshot.traffic_policies == ()
        assert mesh.snapshot.version > first


def test_watcher_reloads_on_a_file_added_changed_and_removed(policy_dir: Path) -> None:
    registry = CollectorRegistry()
    with meshlib.Mesh.from_file(
        policy_dir, service="t", poll_interval=POLL, registry=registry
    ) as mesh:
        replace_file(policy_dir / "30-details.yaml", service("details"))
        wait_for(lambda: "details" in services(mesh), "the added file to apply")
        assert services(mesh) == {"reviews", "ratings", "details"}

        changed = service("ratings") + "---\n" + timeout_policy("reviews", "5s")
        replace_file(policy_dir / "20-ratings.yml", changed)
        wait_for(
            lambda: mesh.snapshot.traffic_policies[0].fields["timeout"] == 5.0,
            "the change to apply",
        )

        (policy_dir / "30-details.yaml").unlink()
        wait_for(lambda: "details" not in services(mesh), "the removed file to apply")
        assert services(mesh) == {"reviews", "ratings"}
        assert reloads(registry, "applied") == 3 and reloads(registry, "rejected") == 0

        # What the directory does not read is not watched either: no reload.
        version = mesh.snapshot.version
        (policy_dir / "notes.txt").write_text("x")
        (policy_dir / "sub" / "nested.yaml").write_text(service("nested2"))
        replace_file(policy_dir / "10-reviews.yaml", service("reviews", 9081))
        wait_for(lambda: mesh.snapshot.version != version, "the last change to apply")
        assert reloads(registry, "applied") == 4
        assert "nested" not in services(mesh) and "nested2" not in services(mesh)


def test_a_bad_file_in_the_set_keeps_the_last_good_snapshot(
    policy_dir: Path, tmp_path: Path
) -> None:
    extra = tmp_path / "details.yaml"
    extra.write_text(service("details"))
    registry = CollectorRegistry()
    with meshlib.Mesh.from_file(
        [policy_dir, extra], service="t", poll_interval=POLL, registry=registry
    ) as mesh:
        before = mesh.snapshot
        bad = policy_dir / "20-ratings.yml"
        text = service("ratings") + "---\n" + timeout_policy("reviews", "2s").replace("2s", "2x")
        replace_file(bad, text)
        wait_for(lambda: reloads(registry, "rejected") >= 1, "the bad file to be rejected")
        assert mesh.snapshot is before
        error = mesh.last_error
        assert error is not None and mesh.reload_status.ok is False
        [problem] = error.problems
        assert (problem.file, problem.line, problem.field) == (str(bad), 11, "spec.timeout")
        assert f"{bad}:11:" in str(error)
        joined = b"\0".join(p.read_bytes() for p in (policy_dir / "10-reviews.yaml", bad, extra))
        assert mesh.reload_status.digest == hashlib.sha256(joined).hexdigest()

        # A reference that breaks across files: the other file is named.
        replace_file(bad, service("ratings") + "---\n" + timeout_policy("reviews", "2s"))
        wait_for(lambda: mesh.reload_status.ok, "the fixed file to be read")
        assert mesh.snapshot is before  # the content in force again: nothing to apply
        replace_file(policy_dir / "10-reviews.yaml", service("reviewz"))
        wait_for(lambda: reloads(registry, "rejected") >= 2, "the broken reference")
        assert mesh.snapshot is before
        assert mesh.last_error is not None
        assert {p.file for p in mesh.last_error.problems} == {str(bad)}

        replace_file(policy_dir / "10-reviews.yaml", service("reviews", 9081))
        wait_for(lambda: mesh.snapshot.version != before.version, "the fixed set to apply")
        assert mesh.reload_status.ok and mesh.last_error is None
        assert reloads(registry, "applied") == 1


def test_an_emptied_directory_is_refused(policy_dir: Path) -> None:
    registry = CollectorRegistry()
    with meshlib.Mesh.from_file(
        policy_dir, service="t", poll_interval=POLL, registry=registry
    ) as mesh:
        before = mesh.snapshot
        for name in ("10-reviews.yaml", "20-ratings.yml"):
            (policy_dir / name).unlink()
        wait_for(lambda: reloads(registry, "rejected") >= 1, "the emptied directory")
        assert mesh.snapshot is before
        assert mesh.last_error is not None
        assert [(p.file, p.message) for p in mesh.last_error.problems] == [
            (str(policy_dir), "the directory holds no *.yaml or *.yml file")
        ]
    with pytest.raises(ConfigError, match="holds no"):
        load_paths([policy_dir])


def test_from_file_needs_a_path() -> None:
    with pytest.raises(ValueError, match="no policy file or directory"):
        meshlib.Mesh.from_file([], service="t")


def test_from_env_takes_several_policy_paths(
    policy_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = tmp_path / "details.yaml"
    extra.write_text(service("details"))
    monkeypatch.delenv("MESHLIB_REGISTRY", raising=False)
    monkeypatch.delenv("MESHLIB_JOIN_TOKEN", raising=False)
    monkeypatch.delenv("MESHLIB_SVID_DIR", raising=False)
    monkeypatch.setenv("MESHLIB_SERVICE", "t")
    monkeypatch.setenv("MESHLIB_POLICY", f"{policy_dir}{os.pathsep}{extra}")
    with meshlib.Mesh.from_env(poll_interval=POLL, metrics=False) as mesh:
        assert services(mesh) == {"reviews", "ratings", "details"}
        replace_file(extra, service("productpage"))
        wait_for(lambda: "productpage" in services(mesh), "the second path to be watched")
        assert "details" not in services(mesh)
    monkeypatch.setenv("MESHLIB_POLICY", os.pathsep)
    with pytest.raises(ValueError, match="MESHLIB_POLICY"):
        meshlib.Mesh.from_env()


def test_a_change_while_the_files_are_read_is_not_lost(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file changed after ``from_file`` read it but before the watcher's first look: the
    watcher's first look would see no change, so ``from_file`` reloads at once."""
    from meshlib.config import loader

    real = loader.load_paths

    def load_then_change(*args: object, **kwargs: object) -> object:
        snapshot = real(*args, **kwargs)  # type: ignore[arg-type]
        replace_file(policy_dir / "30-details.yaml", service("details"))
        return snapshot

    monkeypatch.setattr(loader, "load_paths", load_then_change)
    # A poll far beyond the test's timeout: only from_file itself can have read the change.
    with meshlib.Mesh.from_file(policy_dir, service="t", poll_interval=600, metrics=False) as m:
        assert services(m) == {"reviews", "ratings", "details"}


def test_a_reload_parses_only_the_files_that_changed(
    policy_dir: Path, parsed_texts: list[int]
) -> None:
    """Each reload of a set reads every file, but parses and schema-checks only those whose
    text changed since the last load (``ReadCache``); the snapshot is the one a fresh load of
    the same files gives, and so is a problem's file:line:column in an unchanged file."""

    parsed = parsed_texts
    (policy_dir / "30-details.yaml").write_text(service("details"))
    with meshlib.Mesh.from_file(policy_dir, service="t", watch=False, metrics=False) as mesh:
        assert len(parsed) == 3
        changed = service("details", 9081)
        (policy_dir / "30-details.yaml").write_text(changed)
        assert mesh.reload() is True
        assert parsed[3:] == [len(changed)]
        fresh = load_paths([policy_dir])
        assert dataclasses.replace(mesh.snapshot, version=0) == fresh
        parsed.clear()
        assert mesh.reload() is True  # nothing changed: nothing parsed
        assert parsed == []

        # A change in one file breaks a reference in another, unchanged one: its problem has
        # the column a fresh load gives (the unchanged file is parsed again for it).
        (policy_dir / "10-reviews.yaml").write_text(service("reviewz"))
        assert mesh.reload() is False
        with pytest.raises(ConfigError) as fresh_error:
            load_paths([policy_dir])
        assert mesh.last_error is not None
        assert mesh.last_error.problems == fresh_error.value.problems
        [problem] = mesh.last_error.problems
        assert problem.file == str(policy_dir / "20-ratings.yml") and problem.column > 0


@pytest.mark.timeout(20)
def test_calls_follow_a_change_to_one_file_of_a_directory(
    tmp_path: Path, echo_factory: Callable[..., Any]
) -> None:
    """Real calls through a mesh watching a directory: a split in one file moves traffic to a
    service another file declares, and every response is tagged with an applied version."""
    v1, v2 = echo_factory("v1"), echo_factory("v2")
    directory = tmp_path / "policy.d"
    directory.mkdir()
    (directory / "10-services.yaml").write_text(
        service("reviews", v1.port) + "---\n" + service("reviews-v2", v2.port)
    )
    (directory / "20-split.yaml").write_text(
        "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: m}\nspec: {}\n"
    )
    registry = CollectorRegistry()
    with (
        meshlib.Mesh.from_file(
            directory, service="t", poll_interval=POLL, registry=registry, seed=7
        ) as mesh,
        mesh.client() as client,
    ):
        first = mesh.snapshot.version
        assert client.get("http://reviews/r").headers["x-backend"] == "v1"
        replace_file(
            directory / "20-split.yaml",
            "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\n"
            "metadata: {name: s}\nspec:\n  service: reviews\n"
            "  backends:\n  - {service: reviews-v2, weight: 100}\n",
        )
        wait_for(lambda: mesh.snapshot.version != first, "the split to apply")
        response = client.get("http://reviews/r")
        assert response.headers["x-backend"] == "v2"
        assert response.extensions["mesh_decision"].snapshot_version == mesh.snapshot.version
        assert reloads(registry, "applied") == 1
