"""Every input ends in a snapshot or a ConfigError naming file, line and field (issue 8, item 1),
and a file with no documents is a ConfigError, never an empty policy (item 2).

Each input named in the issue has its own regression test here; the property-based sweep over
the documentation's examples is test_cfg_fuzz.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cfgdocs import N_SERVICES, find, line_of, problems, with_services

import meshlib
from meshlib.config.loader import INTERNAL_ERROR, NO_DOCUMENTS, load_file, load_files, load_text
from meshlib.errors import ConfigError, Problem

HUGE = "9" * 400


def policy(spec: str) -> str:
    return f"apiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {{name: p}}\nspec: {spec}\n"


def mesh_doc(spec: str) -> str:
    return f"apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {{name: m}}\nspec: {spec}\n"


def service_doc(spec: str) -> str:
    return f"apiVersion: meshlib/v1\nkind: Service\nmetadata: {{name: svc}}\nspec: {spec}\n"


def only(found: list[Problem], field: str, contains: str = "") -> Problem:
    """The problem on ``field``; no other problem, and none from the last-resort guard."""
    assert not any(INTERNAL_ERROR in p.message for p in found), found
    p = find(found, field, contains)
    assert [q for q in found if q.field != field] == [], found
    return p


# --- item 1: the inputs named in the issue --------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "digits"),
    [(HUGE + "s", 400), ("1." + "1" * 400 + "s", 401), ("1s" + HUGE + "ms", 400)],
)
def test_duration_of_hundreds_of_digits(duration: str, digits: int) -> None:
    text = with_services(policy(f"{{target: {{service: reviews}}, timeout: '{duration}'}}"))
    p = only(problems(text), "spec.timeout", f"a number of {digits} digits")
    assert "at most 18" in p.message
    assert p.file == "test.yaml" and p.line == line_of(text, "timeout:")
    assert p.document == N_SERVICES + 1
    assert len(p.message) < 200  # the value is named, not printed in full


def test_v1alpha1_quantity_of_hundreds_of_digits() -> None:
    split = (
        "apiVersion: split.smi-spec.io/v1alpha1\nkind: TrafficSplit\nmetadata: {name: s}\n"
        f"spec:\n  service: reviews\n  backends:\n  - {{service: reviews-v1, weight: '{HUGE}m'}}\n"
    )
    p = only(problems(with_services(split)), "spec.backends[0].weight", "400 digits")
    assert p.line == line_of(with_services(split), "weight:")


NUMBER_FIELDS = [
    ("rate", "spec.rateLimit.requestsPerSecond", "{rateLimit: {requestsPerSecond: %s}}"),
    ("ratio", "spec.retries.budget.ratio", "{retries: {budget: {ratio: %s}}}"),
]


@pytest.mark.parametrize(("value", "says"), [(".inf", "finite"), (HUGE, "at most")])
@pytest.mark.parametrize(("label", "field", "spec"), NUMBER_FIELDS)
def test_infinite_or_huge_rate_and_ratio(
    label: str, field: str, spec: str, value: str, says: str
) -> None:
    text = with_services(policy(spec % value))
    p = only(problems(text), field, says)
    assert p.line == line_of(text, "spec:", N_SERVICES + 1), label
    assert p.document == N_SERVICES + 1


@pytest.mark.parametrize(("value", "says"), [(".inf", "finite"), (HUGE, "at most 1")])
def test_infinite_or_huge_sampling(value: str, says: str) -> None:
    p = only(problems(mesh_doc(f"{{tracing: {{sampling: {value}}}}}")), "spec.tracing.sampling")
    assert says in p.message and p.line == 4 and p.document == 1


def test_huge_percent_is_named_briefly() -> None:
    text = with_services(
        "apiVersion: meshlib/v1\nkind: TrafficMirror\nmetadata: {name: m}\n"
        f"spec: {{service: reviews, mirror: ratings, percent: {HUGE}}}\n"
    )
    p = only(problems(text), "spec.percent", "at most 100")
    assert "(400 characters)" in p.message


@pytest.mark.parametrize(("value", "shape"), [("{v: 1}", "a mapping"), ("[v1, v2]", "a list")])
def test_api_version_that_is_not_a_string(value: str, shape: str) -> None:
    text = f"apiVersion: {value}\nkind: Service\nmetadata: {{name: a}}\n"
    p = only(problems(text), "apiVersion", f"apiVersion must be a string, got {shape}")
    assert "meshlib/v1" in p.message and p.line == 1 and p.document == 1


@pytest.mark.parametrize(("value", "shape"), [("5", "an integer"), ("[a, b]", "a list")])
def test_endpoint_labels_that_are_not_a_map(value: str, shape: str) -> None:
    text = service_doc(f"{{endpoints: [{{address: 'h:1', labels: {value}}}]}}")
    p = only(problems(text), "spec.endpoints[0].labels", f"must be a mapping, got {shape}")
    assert p.line == 4


def test_inline_jwks_nested_beyond_any_key_set() -> None:
    doc = (
        "apiVersion: meshlib/v1\nkind: RequestAuthentication\nmetadata: {name: jwt}\n"
        "spec:\n  jwtRules:\n  - issuer: https://issuer\n"
        f"    jwks: '{'[' * 100_000}'\n"
    )
    text = with_services(doc)
    p = only(problems(text), "spec.jwtRules[0].jwks", "nested at most 32 levels")
    assert p.line == line_of(text, "jwks:")


def test_inline_jwks_at_the_depth_bound_is_judged_as_json() -> None:
    """The bound counts brackets outside strings only: a bracket inside a key is text."""
    keys = '{"keys": [{"kty": "RSA", "n": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "e": "AQAB"}]}'
    doc = (
        "apiVersion: meshlib/v1\nkind: RequestAuthentication\nmetadata: {name: jwt}\n"
        f"spec:\n  jwtRules:\n  - issuer: https://issuer\n    jwks: '{keys}'\n"
    )
    snap = load_text(with_services(doc))
    assert snap.request_authentications[0].rules[0].jwks == keys


def test_bytes_that_are_not_utf8_through_text_and_file(tmp_path: Path) -> None:
    data = service_doc("{serviceAccount: x}").encode() + b"# \xff\xfe\n"
    with pytest.raises(ConfigError) as info:
        load_text(data, source="bytes.yaml")
    [p] = info.value.problems
    assert "UTF-8" in p.message and p.file == "bytes.yaml" and p.line == 5
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        meshlib.Mesh.from_file(path, service="svc", watch=False, metrics=False)
    assert info.value.problems[0].line == 5


def test_text_with_a_lone_surrogate() -> None:
    """A Python str can hold what UTF-8 cannot; libyaml used to raise UnicodeEncodeError."""
    [p] = problems(service_doc("{serviceAccount: x}") + "# \ud800\n")
    assert "not valid Unicode" in p.message and "U+D800" in p.message
    assert (p.line, p.column) == (5, 3)


@pytest.mark.parametrize(("char", "code"), [("\x00", "U+0000"), ("\x07", "U+0007")])
def test_control_character_is_named_with_its_line(char: str, code: str) -> None:
    """libyaml reports it with a UTF-8 byte offset and no mark: the line is computed from it."""
    [p] = problems("# é\n" + service_doc(f"{{serviceAccount: 'é{char}'}}"))
    assert f"character {code}" in p.message and "\n" not in p.message
    assert (p.line, p.column) == (5, 26)  # counted in characters, not UTF-8 bytes


def test_valid_bytes_load_like_text() -> None:
    text = service_doc("{serviceAccount: x}")
    assert load_text(text.encode()).digest == load_text(text).digest


# --- item 2: no documents is not a policy ---------------------------------------------------

EMPTY_FILES = {
    "empty": "",
    "blank lines": "\n\n  \n",
    "only ---": "---\n",
    "several ---": "---\n---\n...\n",
    "only comments": "# the policy\n# is coming\n",
    "comments and ---": "# a\n---\n# b\n---\n",
}


@pytest.mark.parametrize("text", EMPTY_FILES.values(), ids=list(EMPTY_FILES))
def test_a_file_without_documents_is_rejected(text: str, tmp_path: Path) -> None:
    [p] = problems(text)
    assert p.message == NO_DOCUMENTS and p.file == "test.yaml" and p.line == 1
    assert "kind: Mesh" in p.message
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        meshlib.Mesh.from_file(path, service="svc", watch=False, metrics=False)
    assert [q.file for q in info.value.problems] == [str(path)]
    with pytest.raises(ConfigError):
        meshlib.Mesh.from_text(text, service="svc", metrics=False)


def test_an_empty_file_among_several_is_named(tmp_path: Path) -> None:
    good, empty = tmp_path / "good.yaml", tmp_path / "empty.yaml"
    good.write_text(with_services())
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError) as info:
        load_files([good, empty])
    assert [(p.file, p.message) for p in info.value.problems] == [(str(empty), NO_DOCUMENTS)]


def test_an_explicit_mesh_document_is_the_empty_policy(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text("# nothing else yet\n---\n" + mesh_doc("{}"))
    snap = load_file(path)
    assert snap.services == {} and [d["kind"] for d in snap.raw_documents] == ["Mesh"]
    with meshlib.Mesh.from_file(path, service="svc", watch=False, metrics=False) as mesh:
        assert mesh.snapshot.digest == snap.digest


def test_a_syntax_error_is_not_reported_as_no_documents() -> None:
    [p] = problems("key: [unclosed\n")
    assert "invalid YAML" in p.message


def test_a_huge_unknown_key_is_named_briefly() -> None:
    """The key of an unknown field is clipped like any value shown: test_cfg_fuzz met a
    5,000-character key printed whole (a 5,075-character message)."""
    key = "k" * 5000
    [p] = problems(mesh_doc(f"\n  ? {key}\n  : 1"))  # "? ": a key may be over 1024 characters
    assert p.message.startswith("unknown field 'kkk") and p.line == 5
    assert "(5002 characters)" in p.message and len(p.message) < 600, p.message


def test_an_empty_or_dotted_key_is_still_named_in_the_field() -> None:
    [p] = problems(mesh_doc("{}") + "'': {a: 1}\n")
    assert p.field == "['']" and "unknown field ''" in p.message and p.line == 5
    text = service_doc("{endpoints: [{address: 'h:1', labels: {app.kubernetes.io/name: 1}}]}")
    [p] = problems(text)
    assert p.field == "spec.endpoints[0].labels['app.kubernetes.io/name']"
