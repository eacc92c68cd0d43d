"""What makes a large policy load fast without changing what it gives (issue 15, item 4): the
cyclic collector paused while the loader builds (``GcPause``), and the fast YAML pass that
records no field paths or columns until a problem asks for one. The speed itself is measured
in benchmarks/config_load.py, never here."""

from __future__ import annotations

import dataclasses
import gc
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshlib.config import loader
from meshlib.config.loader import GC_PAUSE, GcPause, load_text
from meshlib.config.yamlsafe import YMap, YSeq, read_documents
from meshlib.errors import ConfigError

DOCS = Path(__file__).resolve().parents[2] / "docs"
SERVICE = "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: a}\nspec:\n  port: 80\n"


@pytest.fixture
def gc_enabled() -> Iterator[None]:
    """Each test starts with collection enabled and leaves it as it found it."""
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        (gc.enable if was else gc.disable)()


def test_a_load_pauses_collection_while_it_parses_and_restores_it(
    gc_enabled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    real = loader.read_documents

    def spying(text: str) -> Any:
        seen.append(gc.isenabled())
        return real(text)

    monkeypatch.setattr(loader, "read_documents", spying)
    load_text(SERVICE)
    assert seen == [False]
    assert gc.isenabled()
    with pytest.raises(ConfigError):  # a rejected policy restores it too
        load_text(SERVICE + "  port: 81\n")
    assert seen == [False, False]
    assert gc.isenabled()


def test_a_load_leaves_collection_off_when_the_application_turned_it_off(
    gc_enabled: None,
) -> None:
    gc.disable()
    load_text(SERVICE)
    assert not gc.isenabled()


def test_the_pause_nests_and_survives_an_exception(gc_enabled: None) -> None:
    pause = GcPause()
    with pytest.raises(RuntimeError, match="boom"), pause:
        with pause:
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer holder is still inside
        raise RuntimeError("boom")
    assert gc.isenabled()
    assert GC_PAUSE is not pause  # the loader's own pause is untouched
    with GC_PAUSE:
        assert not gc.isenabled()
    assert gc.isenabled()


@pytest.mark.timeout(10)
def test_the_last_of_two_threads_to_leave_enables_collection(gc_enabled: None) -> None:
    """A enters, B enters, A leaves (B still parsing: collection stays off), B leaves."""
    pause = GcPause()
    b_inside, a_left, b_may_leave = threading.Event(), threading.Event(), threading.Event()
    states: dict[str, bool] = {}

    def b() -> None:
        with pause:
            b_inside.set()
            assert b_may_leave.wait(5)
            states["b before leaving"] = gc.isenabled()

    with pause:
        thread = threading.Thread(target=b)
        thread.start()
        assert b_inside.wait(5)
    a_left.set()
    states["after a left"] = gc.isenabled()
    b_may_leave.set()
    thread.join(5)
    assert not thread.is_alive()
    assert states == {"after a left": False, "b before leaving": False}
    assert gc.isenabled()


def test_the_fast_pass_records_columns_only_when_asked() -> None:
    """A plain document is read without its fields' positions; the first column asked for is
    read again from the text, with the position the checked pass gives."""
    [doc], problems = read_documents(SERVICE)
    assert problems == []
    assert doc.positions == {} and doc.source is not None
    assert doc.column_of("spec.port", 5) == 9
    assert doc.column_of("metadata.name", 3) == 18


def test_a_column_in_a_plain_document_of_a_rejected_policy() -> None:
    with pytest.raises(ConfigError) as info:
        load_text(SERVICE.replace("port: 80", "port: 0"))
    [problem] = info.value.problems
    assert (problem.field, problem.line, problem.column) == ("spec.port", 5, 9)


def _same(value: Any, node: yaml.Node, where: str) -> None:
    """``value`` is what PyYAML's own safe loader builds from ``node``, with its lines."""
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        assert isinstance(value, YMap) and value.line == line, where
        assert list(value) == [k.value for k, _ in node.value], where
        for key_node, item in node.value:
            assert value.line_of(key_node.value) == key_node.start_mark.line + 1, where
            _same(value[key_node.value], item, f"{where}.{key_node.value}")
    elif isinstance(node, yaml.SequenceNode):
        assert isinstance(value, YSeq) and value.line == line, where
        assert len(value) == len(node.value), where
        for i, item in enumerate(node.value):
            assert value.line_of(i) == item.start_mark.line + 1, where
            _same(value[i], item, f"{where}[{i}]")
    else:
        expected = yaml.SafeLoader("").construct_object(node)
        assert type(value) is type(expected) and value == expected, where


def _examples() -> Iterator[str]:
    for page in sorted(DOCS.rglob("*.md")):
        yield from re.findall(r"```yaml\n(.*?)```", page.read_text(), re.S)


def test_the_fast_pass_builds_every_documented_example_as_pyyaml_does() -> None:
    """Values, types, key order and the line of every key and item, for each YAML block of the
    docs that PyYAML reads without an alias (the reader refuses aliases)."""
    checked = 0
    for i, text in enumerate(_examples()):
        try:
            nodes = [n for n in yaml.compose_all(text, Loader=yaml.SafeLoader) if n is not None]
        except yaml.YAMLError:
            continue
        docs, problems = read_documents(text)
        if problems:
            continue  # a block that shows a refused document (a duplicate key, a merge key)
        assert len(docs) == len(nodes), i
        for doc, node in zip(docs, nodes, strict=True):
            _same(doc.value, node, f"block {i}")
            checked += 1
    assert checked > 50


def _services(first: int, count: int, port: int = 8080) -> str:
    return "---\n".join(
        f"apiVersion: meshlib/v1\nkind: Service\nmetadata: {{name: s{n}}}\n"
        f"spec:\n  endpoints: [{{address: 'h{n}:{port if n == first else 8080}'}}]\n"
        for n in range(first, first + count)
    )


def test_a_reload_builds_only_the_changed_files_documents(tmp_path: Path) -> None:
    """The services of unchanged files are the very objects of the last snapshot (their builds
    are kept with their documents); the changed file's are new, and the snapshot is the one a
    fresh load of the same files gives."""
    import dataclasses

    import meshlib
    from meshlib.config.loader import load_paths

    for i in range(3):
        (tmp_path / f"part-{i}.yaml").write_text(_services(i * 10, 10))
    with meshlib.Mesh.from_file(tmp_path, service="t", watch=False, metrics=False) as mesh:
        old = mesh.snapshot.services
        (tmp_path / "part-1.yaml").write_text(_services(10, 10, port=9090))
        assert mesh.reload() is True
        new = mesh.snapshot.services
        assert dataclasses.replace(mesh.snapshot, version=0) == load_paths([tmp_path])
    changed = {f"s{n}.default" for n in range(10, 20)}
    assert new.keys() == old.keys()
    assert all(new[k] is old[k] for k in old if k not in changed)
    assert not any(new[k] is old[k] for k in changed)
    assert new["s10.default"].endpoints[0].address == "h10:9090"


def test_a_kept_build_reports_its_reference_problems_again(tmp_path: Path) -> None:
    """A split in an unchanged file whose backend's file changed: the reference is checked
    again on the kept build, and the problem points at the unchanged file."""
    import meshlib

    (tmp_path / "a.yaml").write_text(_services(0, 2))
    split = (
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: sp}\n"
        "spec:\n  service: s0\n  backends:\n  - {service: s1, weight: 1}\n"
    )
    (tmp_path / "b.yaml").write_text(split)
    with meshlib.Mesh.from_file(tmp_path, service="t", watch=False, metrics=False) as mesh:
        (tmp_path / "a.yaml").write_text(_services(0, 1))  # s1 is gone
        assert mesh.reload() is False
        assert mesh.last_error is not None
        [problem] = mesh.last_error.problems
        assert problem.file.endswith("b.yaml") and "s1" in problem.message
        (tmp_path / "a.yaml").write_text(_services(0, 2))  # back: the kept build is fine again
        assert mesh.reload() is True


def test_an_unchanged_file_is_read_again_only_to_report_a_problem_in_it(
    tmp_path: Path, parsed_texts: list[int]
) -> None:
    """The cache keeps no parsed tree of a Service or a TrafficPolicy (only a TrafficSplit's,
    which the reference check walks on every load): a reload that changes another file reads
    the unchanged one not at all when all is well, and once when a problem in it must be
    reported, with the very problems (lines, fields, columns) a fresh load gives."""
    import meshlib
    from meshlib.config.loader import load_paths

    parsed = parsed_texts
    (tmp_path / "a.yaml").write_text(_services(0, 2))
    unchanged = "---\n".join(
        [
            _services(5, 1),
            "apiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: tp}\n"
            "spec:\n  target:\n    service: s1\n  timeout: 2s\n",
            "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: sp}\n"
            "spec:\n  service: s0\n  backends:\n  - {service: s5, weight: 1}\n",
        ]
    )
    (tmp_path / "b.yaml").write_text(unchanged)
    with meshlib.Mesh.from_file(tmp_path, service="t", watch=False, metrics=False) as mesh:
        changed = _services(0, 2, port=9090)
        (tmp_path / "a.yaml").write_text(changed)
        parsed.clear()
        assert mesh.reload() is True
        assert parsed == [len(changed)]  # b.yaml is not read again
        assert dataclasses.replace(mesh.snapshot, version=0) == load_paths([tmp_path])

        # s1 gone (b's policy targets it) and s5 declared in a.yaml too (b's is the duplicate).
        (tmp_path / "a.yaml").write_text(_services(0, 1) + "---\n" + _services(5, 1))
        parsed.clear()
        assert mesh.reload() is False
        assert parsed.count(len(unchanged)) == 1  # read once, for both problems and columns
        with pytest.raises(ConfigError) as fresh:
            load_paths([tmp_path])
        assert mesh.last_error is not None
        assert mesh.last_error.problems == fresh.value.problems
        found = {(p.file.rsplit("/", 1)[1], p.field) for p in fresh.value.problems}
        assert found == {("b.yaml", "metadata.name"), ("b.yaml", "spec.target.service")}
        assert all(p.column > 0 for p in fresh.value.problems)
