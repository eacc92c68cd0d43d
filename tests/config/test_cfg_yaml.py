"""YAML-level safety (CFG-1, CFG-3, CFG-7): syntax errors, duplicate keys, bombs, size limits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cfgdocs import SERVICES, find, line_of, problems

from meshlib.config.loader import MAX_FILE_BYTES, load_file, load_files, load_text
from meshlib.errors import ConfigError

SERVICE = "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: a}\n"


def test_bad_indentation_reports_line_and_column() -> None:
    text = SERVICE + "spec:\n  port: 80\n endpoints: []\n"
    [p] = problems(text)
    assert p.line == 6 and p.column >= 1
    assert "invalid YAML" in p.message
    assert p.document == 1


def test_tab_indentation_is_explained() -> None:
    text = SERVICE + "spec:\n\tport: 80\n"
    [p] = problems(text)
    assert p.line == 5
    assert "tab" in p.message


def test_unclosed_quote() -> None:
    text = SERVICE + 'spec: {serviceAccount: "abc}\n'
    [p] = problems(text)
    assert "invalid YAML" in p.message
    assert p.line >= 4


def test_syntax_error_in_later_document_names_that_document() -> None:
    text = SERVICES + "---\n" + SERVICE + "spec: [\n"
    [p] = problems(text)
    assert p.document == 5


def test_duplicate_key_rejected_not_last_wins() -> None:
    text = SERVICE + "spec:\n  port: 80\n  port: 81\n"
    [p] = problems(text)
    assert p.field == "spec.port"
    assert p.line == 6
    assert "duplicate key 'port'" in p.message and "line 5" in p.message


def test_non_string_key_rejected() -> None:
    text = SERVICE + "spec:\n  1: x\n"
    [p] = problems(text)
    assert "not a string" in p.message and p.line == 5


def test_yaml_one_point_one_boolean_key_rejected_with_quote_hint() -> None:
    [p] = problems(SERVICE + "spec:\n  on: x\n")
    assert "quote it" in p.message


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_billion_laughs_rejected_at_the_first_alias() -> None:
    """Rejected where the first alias is met, before anything is expanded: the work is bounded
    by the text's size (benchmarks/config_load.py measures it)."""
    [p] = problems(BILLION_LAUGHS)
    assert "aliases" in p.message
    assert p.field == "b[0]" and p.line == 2


def test_any_alias_rejected() -> None:
    text = (
        SERVICE
        + "spec: {serviceAccount: &sa x, port: 80}\n---\n"
        + SERVICE.replace("name: a", "name: b")
        + "spec: {serviceAccount: *sa}\n"
    )
    found = problems(text)
    # Aliases cannot cross documents in YAML: libyaml reports an undefined alias.
    assert found and found[0].document == 2


def test_alias_within_document_rejected_with_field() -> None:
    text = SERVICE + "spec:\n  endpoints:\n  - &e {address: 'h:1'}\n  - *e\n"
    [p] = problems(text)
    assert p.field == "spec.endpoints[1]"
    assert "aliases" in p.message


def test_merge_key_rejected() -> None:
    text = SERVICE + "spec:\n  endpoints:\n  - &e {address: 'h:1'}\n  - {<<: *e, weight: 2}\n"
    found = problems(text)
    assert any("merge keys" in p.message or "aliases" in p.message for p in found)


def test_deep_nesting_rejected_without_recursion_error() -> None:
    text = "a: " + "[" * 10_000 + "]" * 10_000 + "\n"
    [p] = problems(text)
    assert "nesting deeper than 64" in p.message
    assert p.line == 1


def test_moderately_deep_block_nesting_rejected_by_own_limit() -> None:
    text = "".join(" " * i + f"k{i}:\n" for i in range(80)) + " " * 80 + "v\n"
    [p] = problems(text)
    assert "nesting deeper than 64" in p.message
    assert p.line == 66  # the 66th mapping is the 65th level below the top


def test_too_many_documents() -> None:
    text = "---\n{}\n" * 1001
    found = problems(text)
    assert any("more than 1000 documents" in p.message for p in found)


def test_empty_documents_are_skipped() -> None:
    snap = load_text("---\n---\n" + SERVICE + "---\n")
    assert list(snap.services) == ["a.default"]
    assert snap.services["a.default"].origin is not None
    assert snap.services["a.default"].origin.document == 2


def test_huge_file_rejected_without_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(50 * 1024 * 1024)  # sparse: costs no disk, and must never be read
    read_sizes: list[int] = []
    real_open = open

    def spy_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        handle = real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]
        if str(file) == str(path):
            read_sizes.append(-1)
        return handle

    monkeypatch.setattr("builtins.open", spy_open)
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert read_sizes == []  # rejected from stat() alone: never opened, so never read
    [p] = info.value.problems
    assert "larger than" in p.message and str(MAX_FILE_BYTES) in p.message
    assert p.file == str(path) and p.document == 0


def test_text_over_cap_rejected() -> None:
    [p] = problems("#" * (MAX_FILE_BYTES + 1))
    assert "larger than" in p.message


def test_invalid_utf8_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(SERVICE.encode() + b"spec: {serviceAccount: \xff\xfe}\n")
    with pytest.raises(ConfigError) as info:
        load_file(path)
    [p] = info.value.problems
    assert "UTF-8" in p.message and p.line == 4


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_files([tmp_path / "nope.yaml", tmp_path / "nope2.yaml"])
    assert len(info.value.problems) == 2
    assert all("cannot read" in p.message for p in info.value.problems)


def test_bom_is_accepted() -> None:
    assert "a.default" in load_text("\ufeff" + SERVICE).services


def _large_policy(target_bytes: int) -> str:
    parts: list[str] = []
    size = 0
    n = 0
    while size < target_bytes:
        endpoints = "".join(
            f"  - address: pod-{n}-{i}.svc-{n}.ns-{n % 7}.svc.cluster.local:8080\n"
            f"    weight: {1 + i % 5}\n"
            f"    labels: {{topology.kubernetes.io/zone: europe-west-{i % 3}, "
            f"app.kubernetes.io/version: v{i % 2}.{n}.0}}\n"
            for i in range(100)
        )
        part = (
            f"apiVersion: meshlib/v1\nkind: Service\nmetadata:\n  name: svc-{n}\n"
            f"  namespace: ns-{n % 7}\nspec:\n  serviceAccount: sa-{n}\n  port: 8080\n"
            f"  endpoints:\n{endpoints}---\n"
        )
        parts.append(part)
        size += len(part)
        n += 1
    return "".join(parts)


def test_large_legitimate_file_is_accepted(tmp_path: Path) -> None:
    text = _large_policy(5 * 1024 * 1024)
    path = tmp_path / "large.yaml"
    path.write_text(text)
    assert os.path.getsize(path) > 5_000_000
    snap = load_file(path)  # how long it takes: benchmarks/config_load.py
    assert len(snap.services) == text.count("kind: Service")
    assert all(len(s.endpoints) == 100 for s in snap.services.values())


def test_line_numbers_survive_many_documents() -> None:
    text = SERVICES + "---\n" + SERVICE.replace("name: a", "name: x") + "spec: {port: 0}\n"
    [p] = problems(text)
    assert p.line == line_of(text, "spec: {port: 0}")
    assert p.document == 5
    assert find([p], "spec.port", "at least 1")


def test_digest_version_and_raw_documents() -> None:
    import hashlib

    snap = load_text(SERVICES, source="s.yaml", version=7)
    assert snap.digest == hashlib.sha256(SERVICES.encode()).hexdigest()
    assert snap.version == 7 and snap.source == "s.yaml"
    assert [d["metadata"]["name"] for d in snap.raw_documents] == [
        "reviews",
        "reviews-v1",
        "reviews-v2",
        "ratings",
    ]
