"""SMI kinds in every published version, as real manifests write them (CFG-4, CFG-6)."""

from __future__ import annotations

import pytest
from cfgdocs import N_SERVICES, find, line_of, load, problems_with_services, with_services

SPLIT_V1 = """
apiVersion: split.smi-spec.io/v1alpha1
kind: TrafficSplit
metadata: {name: canary}
spec:
  service: reviews
  backends:
  - service: reviews-v1
    weight: 500m
  - service: reviews-v2
    weight: 100m
"""


def split(version: int, w1: object = 90, w2: object = 10, extra: str = "") -> str:
    return f"""
apiVersion: split.smi-spec.io/v1alpha{version}
kind: TrafficSplit
metadata: {{name: canary}}
spec:
  service: reviews
  backends:
  - service: reviews-v1
    weight: {w1}
  - service: reviews-v2
    weight: {w2}
{extra}"""


def test_split_v1alpha1_quantities_become_milli_units() -> None:
    snap = load(SPLIT_V1)
    s = snap.splits["reviews.default"]
    assert [(b.service, b.weight) for b in s.backends] == [
        ("reviews-v1.default", 500),
        ("reviews-v2.default", 100),
    ]
    assert s.origin is not None and s.origin.document == N_SERVICES + 1


@pytest.mark.parametrize(
    ("w1", "w2", "expected"),
    [("1", "0", (1000, 0)), (1, "500m", (1000, 500)), ("0.5", "250m", (500, 250))],
)
def test_split_v1alpha1_quantity_forms(w1: object, w2: object, expected: tuple[int, int]) -> None:
    s = load(split(1, w1, w2)).splits["reviews.default"]
    assert tuple(b.weight for b in s.backends) == expected


@pytest.mark.parametrize("version", [2, 3, 4])
def test_split_integer_weights(version: int) -> None:
    s = load(split(version, 90, 10)).splits["reviews.default"]
    assert [b.weight for b in s.backends] == [90, 10]
    assert s.root == "reviews.default"


def test_split_v1alpha2_rejects_quantities_and_fractions() -> None:
    doc = split(2, "500m", 1.5)
    found = problems_with_services(doc)
    p = find(found, "spec.backends[0].weight", "integer")
    assert p.line == line_of(with_services(doc), "weight: 500m")
    assert p.document == N_SERVICES + 1
    assert "whole number" in find(found, "spec.backends[1].weight").message


def test_split_v1alpha1_rejects_negative_and_sub_milli() -> None:
    found = problems_with_services(split(1, "-1", "0.0001"))
    assert "at least 0" in find(found, "spec.backends[0].weight").message
    assert "milli" in find(found, "spec.backends[1].weight").message


ROUTES_V4 = """
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: ab-test}
spec:
  matches:
  - name: firefox-users
    pathRegex: /reviews/.*
    methods: [get, head]
    headers:
      User-Agent: ".*Firefox.*"
  - name: everything
    pathRegex: ".*"
    methods: ["*"]
"""


def test_split_v1alpha3_matches_reference_route_groups() -> None:
    extra = "  matches:\n  - kind: HTTPRouteGroup\n    name: ab-test\n"
    snap = load(split(3, 0, 100, extra), ROUTES_V4)
    s = snap.splits["reviews.default"]
    assert [m.group for m in s.matches] == ["ab-test.default"]


@pytest.mark.parametrize("version", [1, 2])
def test_split_matches_rejected_before_v1alpha3(version: int) -> None:
    extra = "  matches:\n  - kind: HTTPRouteGroup\n    name: ab-test\n"
    found = problems_with_services(split(version, 1, 1, extra), ROUTES_V4)
    assert find(found, "spec.matches", "unknown field")


def test_split_match_to_missing_route_group() -> None:
    extra = "  matches:\n  - kind: HTTPRouteGroup\n    name: nope\n"
    found = problems_with_services(split(4, 1, 1, extra))
    assert "does not exist" in find(found, "spec.matches[0].name").message


def test_route_group_v1alpha4_map_headers_and_methods() -> None:
    group = load(ROUTES_V4).route_groups["ab-test.default"]
    firefox, everything = group.matches
    assert firefox.methods == frozenset({"GET", "HEAD"})
    assert everything.methods is None
    assert [name for name, _ in firefox.headers] == ["user-agent"]
    assert firefox.headers[0][1].search("Mozilla Firefox/1") is not None
    assert firefox.path_regex is not None
    assert firefox.path_regex.match("/reviews/1") is not None
    # Anchored at the start, SMI style, whichever of match/search the router uses.
    assert firefox.path_regex.search("/x/reviews/1") is None


@pytest.mark.parametrize("version", [1, 2])
def test_route_group_top_level_matches_list_headers(version: int) -> None:
    text = f"""
apiVersion: specs.smi-spec.io/v1alpha{version}
kind: HTTPRouteGroup
metadata: {{name: the-routes}}
matches:
- name: metrics
  pathRegex: "/metrics"
  methods: [GET]
- name: android
  headers:
  - user-agent: ".*Android.*"
  - cookie: "^(.*?;)?(type=insider)(;.*)?$"
"""
    group = load(text).route_groups["the-routes.default"]
    assert [m.name for m in group.matches] == ["metrics", "android"]
    assert [h for h, _ in group.matches[1].headers] == ["user-agent", "cookie"]


def test_route_group_v1alpha3_spec_matches_with_list_headers() -> None:
    text = """
apiVersion: specs.smi-spec.io/v1alpha3
kind: HTTPRouteGroup
metadata: {name: r, namespace: shop}
spec:
  matches:
  - name: iphone
    pathRegex: /api/.*
    headers:
    - user-agent: ".*iPhone.*"
"""
    group = load(text).route_groups["r.shop"]
    assert group.namespace == "shop"
    assert group.matches[0].headers[0][0] == "user-agent"


def test_route_group_version_layout_is_enforced() -> None:
    text = """
apiVersion: specs.smi-spec.io/v1alpha3
kind: HTTPRouteGroup
metadata: {name: r}
matches:
- name: x
"""
    found = problems_with_services(text)
    assert find(found, "matches", "unknown field")
    assert find(found, "spec", "missing required")


def test_duplicate_route_names_in_one_group_and_across_groups() -> None:
    second = ROUTES_V4.replace("ab-test", "other").replace("- name: everything", "- name: x")
    dup_in_group = ROUTES_V4.replace("name: everything", "name: firefox-users")
    found = problems_with_services(dup_in_group, second)
    p = find(found, "spec.matches[1].name", "duplicate route name 'firefox-users'")
    assert p.document == N_SERVICES + 1
    cross = find(found, "spec.matches[0].name", "already used in namespace 'default'")
    assert cross.document == N_SERVICES + 2


REGEX_BOMBS = ["^(a+)+$", "(a|aa)+$", "(x+x+)+y"]


@pytest.mark.parametrize("pattern", REGEX_BOMBS)
def test_catastrophic_patterns_are_compiled_by_re2(pattern: str) -> None:
    """RE2 matches in time linear in the subject (no backtracking), so a pattern that is
    exponential under ``re`` is harmless: what is checked is that RE2 compiled it and answers
    right. How long a match takes is measured by benchmarks/config_load.py."""
    text = ROUTES_V4.replace('pathRegex: ".*"', f'pathRegex: "{pattern}"')
    match = load(text).route_groups["ab-test.default"].matches[1]
    assert match.path_regex is not None
    assert type(match.path_regex).__module__.split(".")[0] == "re2"
    assert match.path_regex.match("a" * 40 + "!") is None  # the backtracking worst case
    assert match.path_regex.match({"^(a+)+$": "aaaa", "(a|aa)+$": "aaa"}.get(pattern, "xxy"))


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [(r"(a)\\1", "backreferences"), ("(?=a)b", "lookaround"), ("(?<!a)b", "lookaround")],
)
def test_backtracking_only_features_rejected(pattern: str, reason: str) -> None:
    text = ROUTES_V4.replace('pathRegex: ".*"', f'pathRegex: "{pattern}"')
    p = find(problems_with_services(text), "spec.matches[1].pathRegex", "RE2")
    assert reason in p.message
    assert p.line == line_of(with_services(text), "pathRegex", 2)


def test_overlong_regex_rejected() -> None:
    text = ROUTES_V4.replace('pathRegex: ".*"', f'pathRegex: "{"a" * 5000}"')
    p = find(problems_with_services(text), "spec.matches[1].pathRegex")
    assert "5000 characters" in p.message and "1024" in p.message


def test_bad_header_regex_and_method() -> None:
    text = ROUTES_V4.replace('".*Firefox.*"', '"(?=x)"').replace("[get, head]", "[get, 'B@D']")
    found = problems_with_services(text)
    assert find(found, "spec.matches[0].headers.User-Agent", "RE2")
    assert find(found, "spec.matches[0].methods[1]", "not an HTTP method")


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_tcp_route_every_version(version: int) -> None:
    body = {
        1: "",
        2: "",
        3: "spec: {}\n",
        4: "spec:\n  matches:\n    ports: [3306, 6446]\n",
    }[version]
    text = f"apiVersion: specs.smi-spec.io/v1alpha{version}\nkind: TCPRoute\n"
    text += "metadata: {name: db}\n" + body
    route = load(text).tcp_routes["db.default"]
    assert route.ports == ((3306, 6446) if version == 4 else ())


TARGET_V1 = """
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha1
metadata: {name: path-specific}
destination: {kind: ServiceAccount, name: reviews, namespace: default, port: "9080"}
specs:
- kind: HTTPRouteGroup
  name: ab-test
  matches: [firefox-users]
sources:
- {kind: ServiceAccount, name: ratings, namespace: default}
"""


def test_traffic_target_v1alpha1() -> None:
    t = load(ROUTES_V4, TARGET_V1).traffic_targets[0]
    assert t.destination == ("reviews", "default")
    assert t.sources == (("ratings", "default"),)
    assert t.rules[0].kind == "HTTPRouteGroup" and t.rules[0].matches == ("firefox-users",)


@pytest.mark.parametrize("version", [2, 3])
def test_traffic_target_spec_form(version: int) -> None:
    text = f"""
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha{version}
metadata: {{name: t}}
spec:
  destination: {{kind: ServiceAccount, name: reviews, namespace: default}}
  rules:
  - kind: HTTPRouteGroup
    name: ab-test
    matches: [everything]
  - kind: TCPRoute
    name: db
  sources:
  - {{kind: ServiceAccount, name: ratings}}
"""
    tcp = "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: db}\n"
    t = load(ROUTES_V4, tcp, text).traffic_targets[0]
    assert [r.kind for r in t.rules] == ["HTTPRouteGroup", "TCPRoute"]


def test_traffic_target_dangling_rules_and_unknown_identity_warning() -> None:
    bad = TARGET_V1.replace("[firefox-users]", "[nope]").replace("name: ratings", "name: ghost")
    found = problems_with_services(ROUTES_V4, bad)
    assert find(found, "specs[0].matches[0]", "no match named 'nope'")
    ok = load(ROUTES_V4, TARGET_V1.replace("name: ratings", "name: ghost"))
    assert any("ghost" in w.message for w in ok.warnings)


def test_smi_manifest_apiversion_mismatch_lists_versions() -> None:
    found = problems_with_services(split(5))
    p = find(found, "apiVersion", "split.smi-spec.io/v1alpha5")
    assert "v1alpha1" in p.message and "v1alpha4" in p.message


def test_multi_file_split_references(tmp_path: object) -> None:
    # A split in one file may name services declared in another.
    from pathlib import Path

    from meshlib.config.loader import load_files

    base = Path(str(tmp_path))
    (base / "services.yaml").write_text(with_services())
    (base / "split.yaml").write_text(split(2).lstrip())
    snap = load_files([base / "services.yaml", base / "split.yaml"])
    assert "reviews.default" in snap.splits
    assert snap.source.endswith("split.yaml")


# UDPRoute, as the SMI traffic-specs v1alpha4 document writes it (apis/traffic-specs/v1alpha4).
UDP_ROUTE = """
apiVersion: specs.smi-spec.io/v1alpha4
kind: UDPRoute
metadata:
  name: the-routes
spec:
  matches:
    ports:
    - 989
    - 990
"""
UDP_ROUTE_ALL_PORTS = """
apiVersion: specs.smi-spec.io/v1alpha4
kind: UDPRoute
metadata:
  name: udp-ports
spec:
  matches:
    ports: []
"""


def udp_target(route: str = "the-routes", version: int = 3) -> str:
    return f"""
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha{version}
metadata: {{name: dns}}
spec:
  destination: {{kind: ServiceAccount, name: reviews, namespace: default}}
  rules:
  - kind: UDPRoute
    name: {route}
  sources:
  - {{kind: ServiceAccount, name: ratings}}
"""


def test_udp_route_as_the_smi_spec_writes_it() -> None:
    snap = load(UDP_ROUTE, UDP_ROUTE_ALL_PORTS)
    route = snap.udp_routes["the-routes.default"]
    assert route.ports == (989, 990)
    assert route.origin is not None and route.origin.document == N_SERVICES + 1
    assert snap.udp_routes["udp-ports.default"].ports == ()
    assert snap.tcp_routes == {}


def test_traffic_target_rule_names_a_udp_route_and_says_http_only() -> None:
    snap = load(UDP_ROUTE, udp_target())
    t = snap.traffic_targets[0]
    assert [(r.kind, r.name) for r in t.rules] == [("UDPRoute", "the-routes")]
    [w] = [w for w in snap.warnings if "UDPRoute" in w.message]
    assert w.field == "spec.rules[0]" and "HTTP traffic only" in w.message
    assert w.line == line_of(with_services(UDP_ROUTE, udp_target()), "kind: UDPRoute", 2)


def test_dangling_udp_route_names_the_kind_the_rule_asked_for() -> None:
    text = with_services(udp_target("udp-ports"))
    [p] = [p for p in problems_with_services(udp_target("udp-ports")) if "exist" in p.message]
    assert p.field == "spec.rules[0].name"
    assert p.message == "UDPRoute 'udp-ports' does not exist in namespace 'default'"
    assert p.line == line_of(text, "name: udp-ports")


def test_dangling_tcp_route_error_is_on_its_name_line() -> None:
    doc = udp_target("db").replace("kind: UDPRoute", "kind: TCPRoute")
    [p] = [p for p in problems_with_services(doc) if "exist" in p.message]
    assert p.message == "TCPRoute 'db' does not exist in namespace 'default'"
    assert p.line == line_of(with_services(doc), "name: db")


def test_error_names_the_rule_it_is_about_when_an_earlier_rule_is_incomplete() -> None:
    doc = udp_target("nope").replace(
        "  rules:\n", "  rules:\n  - kind: HTTPRouteGroup\n"
    )  # rule 0 has no name (reported by the structural check); rule 1 dangles
    found = problems_with_services(UDP_ROUTE, doc)
    assert find(found, "spec.rules[0].name", "missing required field")
    assert find(found, "spec.rules[1].name", "UDPRoute 'nope' does not exist")


@pytest.mark.parametrize("version", [1, 2, 3])
def test_udp_route_only_in_v1alpha4(version: int) -> None:
    old = UDP_ROUTE.replace("v1alpha4", f"v1alpha{version}")
    p = find(problems_with_services(old), "apiVersion", "is not known for UDPRoute")
    assert "specs.smi-spec.io/v1alpha4" in p.message


def test_udp_route_rule_needs_traffic_target_v1alpha3() -> None:
    found = problems_with_services(UDP_ROUTE, udp_target(version=2))
    p = find(found, "spec.rules[0].kind", "'UDPRoute' is not one of HTTPRouteGroup, TCPRoute")
    assert p.line == line_of(with_services(UDP_ROUTE, udp_target(version=2)), "kind: UDPRoute", 2)
    assert not [q for q in found if "does not exist" in q.message]  # not a wrong-kind error


def test_udp_route_ports_are_checked() -> None:
    bad = UDP_ROUTE.replace("- 990", "- 70000")
    assert find(problems_with_services(bad), "spec.matches.ports[1]", "at most 65535")
