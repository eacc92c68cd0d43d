"""HTTPRoute semantics over loaded snapshots, without sockets (issue 14): precedence across
rules and routes, path, header and query matching, GAMMA attachment, weighted picks (seeded)
and what the filters do to paths, redirects and headers. The conformance suite covers the
upstream cases; these are the edges it does not reach."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping

import httpx
import pytest

from meshlib.config.loader import load_text
from meshlib.config.model import (
    HeaderModifier,
    PathMatch,
    PathMatchType,
    PathModifier,
    PathModifierType,
    RequestRedirect,
    RouteMatch,
)
from meshlib.policy.routes import (
    RouteIndex,
    RouteTable,
    edit_headers,
    pick,
    redirect_location,
    request_edit,
    rewrite_path,
)
from policy.fakes import binomial_bounds

SEED = 14


def services(*names: str, namespace: str = "default") -> str:
    return "".join(
        "---\napiVersion: meshlib/v1\nkind: Service\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        'spec: {endpoints: [{address: "127.0.0.1:8001"}]}\n'
        for name in names
    )


BASE = services("web", "a", "b", "c")


def route(
    name: str,
    rules: str,
    *,
    namespace: str = "default",
    parent: str = "name: web",
    created: str | None = None,
) -> str:
    """An HTTPRoute document; ``rules`` is the YAML list under ``spec.rules`` (indented 2)."""
    stamp = f"\n  creationTimestamp: '{created}'" if created else ""
    return (
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}{stamp}\n"
        f'spec:\n  parentRefs: [{{group: "", kind: Service, {parent}}}]\n'
        f"  rules:\n{rules}"
    )


def rule(name: str, match: str = "{}", backend: str = "a") -> str:
    """One named rule with one match (flow YAML) and one backend."""
    return (
        f"  - name: {name}\n    matches: [{match}]\n"
        f"    backendRefs: [{{name: {backend}, port: 80}}]\n"
    )


def table_of(
    text: str, *, service: str = "web.default", caller: str = "default", port: int | None = 80
) -> RouteTable | None:
    return RouteIndex(load_text(text)).table(service, caller, port)


def winner(
    table: RouteTable | None,
    path: str,
    *,
    method: str = "GET",
    query: str = "",
    headers: Mapping[str, str] | None = None,
) -> str | None:
    """The label of the rule that wins the request, or None (the spec's 404)."""
    assert table is not None
    candidate = table.select(method, path, query, httpx.Headers(headers or {}))
    return None if candidate is None else candidate.rule.label


# --- precedence ----------------------------------------------------------------------------------


PRECEDENCE_RULES = (
    # Listed from the lowest precedence to the highest: load order must not matter.
    rule("root", "{path: {type: PathPrefix, value: /}}")
    + rule("short", "{path: {type: PathPrefix, value: /api}}")
    + rule("long", "{path: {type: PathPrefix, value: /api/v1}}")
    + rule("regex", "{path: {type: RegularExpression, value: '/api/v1/[a-z]+'}}")
    + rule("exact", "{path: {type: Exact, value: /api/v1/users}}")
    + rule("get", "{path: {type: PathPrefix, value: /m}, method: GET}")
    + rule(
        "one-header", "{path: {type: PathPrefix, value: /m}, headers: [{name: x-a, value: '1'}]}"
    )
    + rule(
        "two-headers",
        "{path: {type: PathPrefix, value: /h}, headers: [{name: x-a, value: '1'}, "
        "{name: x-b, value: '1'}]}",
    )
    + rule(
        "h-one-header", "{path: {type: PathPrefix, value: /h}, headers: [{name: x-a, value: '1'}]}"
    )
    + rule(
        "h-query",
        "{path: {type: PathPrefix, value: /h}, queryParams: [{name: q, value: '1'}, "
        "{name: r, value: '1'}, {name: s, value: '1'}]}",
    )
    + rule(
        "one-query", "{path: {type: PathPrefix, value: /q}, queryParams: [{name: q, value: '1'}]}"
    )
    + rule(
        "two-queries",
        "{path: {type: PathPrefix, value: /q}, queryParams: [{name: q, value: '1'}, "
        "{name: r, value: '1'}]}",
    )
)


@pytest.mark.parametrize(
    ("path", "method", "headers", "query", "expected"),
    [
        ("/api/v1/users", "GET", {}, "", "exact"),
        ("/api/v1/items", "GET", {}, "", "regex"),  # regex beats the longer prefix
        ("/api/v1/Items", "GET", {}, "", "long"),  # the regex does not match: longest prefix
        ("/api/v2", "GET", {}, "", "short"),
        ("/other", "GET", {}, "", "root"),
        ("/m", "GET", {"x-a": "1"}, "", "get"),  # a method beats a header
        ("/m", "POST", {"x-a": "1"}, "", "one-header"),
        ("/h", "GET", {"x-a": "1", "x-b": "1"}, "q=1&r=1&s=1", "two-headers"),  # headers > query
        ("/h", "GET", {"x-a": "1"}, "q=1&r=1&s=1", "h-one-header"),
        ("/h", "GET", {}, "q=1&r=1&s=1", "h-query"),
        ("/q", "GET", {}, "q=1&r=1", "two-queries"),
        ("/q", "GET", {}, "q=1", "one-query"),
    ],
)
def test_precedence_across_rules(
    path: str, method: str, headers: dict[str, str], query: str, expected: str
) -> None:
    table = table_of(BASE + route("r", PRECEDENCE_RULES))
    assert winner(table, path, method=method, headers=headers, query=query) == expected


def test_precedence_across_routes_ignores_load_order() -> None:
    broad = route("broad", rule("broad", "{path: {type: PathPrefix, value: /}}"))
    narrow = route(
        "narrow",
        rule("narrow-prefix", "{path: {type: PathPrefix, value: /x}}")
        + rule("narrow-exact", "{path: {type: Exact, value: /x/y}}"),
    )
    method = route("method", rule("method", "{path: {type: PathPrefix, value: /x}, method: GET}"))
    for order in ((broad, narrow, method), (method, narrow, broad), (narrow, method, broad)):
        table = table_of(BASE + "".join(order))
        assert winner(table, "/x/y") == "narrow-exact"
        assert winner(table, "/x/z") == "method"
        assert winner(table, "/x/z", method="PUT") == "narrow-prefix"
        assert winner(table, "/z") == "broad"


SAME_MATCH = "{path: {type: PathPrefix, value: /}}"


def test_ties_without_timestamps_go_to_load_order_then_rule_order() -> None:
    first = route("zeta", rule("zeta-1", SAME_MATCH) + rule("zeta-2", SAME_MATCH))
    second = route("alpha", rule("alpha-1", SAME_MATCH))
    assert winner(table_of(BASE + first + second), "/x") == "zeta-1"
    assert winner(table_of(BASE + second + first), "/x") == "alpha-1"


def test_ties_go_to_the_oldest_route_whatever_the_load_order() -> None:
    old = route("zeta", rule("old", SAME_MATCH), created="2024-01-01T00:00:00Z")
    new = route("alpha", rule("new", SAME_MATCH), created="2024-06-01T00:00:00Z")
    assert winner(table_of(BASE + new + old), "/x") == "old"
    assert winner(table_of(BASE + old + new), "/x") == "old"
    # A route without a timestamp counts as the newest.
    unknown = route("aaa", rule("unknown", SAME_MATCH))
    assert winner(table_of(BASE + unknown + new), "/x") == "new"


def test_equal_timestamps_tie_on_namespace_and_name_not_load_order() -> None:
    stamp = "2024-01-01T00:00:00Z"
    zeta = route("zeta", rule("zeta", SAME_MATCH), created=stamp)
    alpha = route("alpha", rule("alpha", SAME_MATCH), created=stamp)
    assert winner(table_of(BASE + zeta + alpha), "/x") == "alpha"
    assert winner(table_of(BASE + alpha + zeta), "/x") == "alpha"


# --- path, header and query matching -------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "path", "matches"),
    [
        ("/v2", "/v2", True),
        ("/v2", "/v2/", True),
        ("/v2", "/v2/x", True),
        ("/v2", "/v2example", False),
        ("/v2", "/v", False),
        ("/v2/", "/v2", True),  # a trailing slash in the prefix is ignored
        ("/v2/", "/v2/x", True),
        ("/v2/", "/v2example", False),
        ("/", "/anything", True),
    ],
)
def test_path_prefix_is_element_wise(prefix: str, path: str, matches: bool) -> None:
    table = table_of(
        BASE + route("r", rule("p", f"{{path: {{type: PathPrefix, value: '{prefix}'}}}}"))
    )
    assert (winner(table, path) == "p") is matches


@pytest.mark.parametrize(
    ("path", "matches"),
    [("/api/12", True), ("/api/12/x", False), ("/x/api/12", False), ("/b", True), ("/bx", False)],
)
def test_path_regex_is_anchored_at_both_ends(path: str, matches: bool) -> None:
    # "/api/[0-9]+|/b": the alternation is anchored as a whole, not just its first branch.
    regex = "{path: {type: RegularExpression, value: '/api/[0-9]+|/b'}}"
    table = table_of(BASE + route("r", rule("re", regex)))
    assert (winner(table, path) == "re") is matches


def test_header_regex_is_anchored_at_both_ends() -> None:
    match = "{headers: [{type: RegularExpression, name: x-v, value: 'ab+'}]}"
    table = table_of(BASE + route("r", rule("re", match)))
    assert winner(table, "/", headers={"x-v": "abb"}) == "re"
    assert winner(table, "/", headers={"x-v": "xabb"}) is None
    assert winner(table, "/", headers={"x-v": "abbx"}) is None


def test_header_names_are_case_insensitive_and_values_case_sensitive() -> None:
    table = table_of(BASE + route("r", rule("h", "{headers: [{name: X-Env, value: Prod}]}")))
    assert winner(table, "/", headers={"x-env": "Prod"}) == "h"
    assert winner(table, "/", headers={"X-ENV": "Prod"}) == "h"
    assert winner(table, "/", headers={"x-env": "prod"}) is None
    # The table is looked up with lower-case names: a plain dict of them works too.
    assert table is not None
    candidate = table.select("GET", "/", "", {"x-env": "Prod"})
    assert candidate is not None and candidate.rule.label == "h"


def test_the_first_query_value_wins_and_names_are_case_sensitive() -> None:
    table = table_of(
        BASE
        + route(
            "r",
            rule("one", "{queryParams: [{name: v, value: '1'}]}")
            + rule("two", "{queryParams: [{name: v, value: '2'}]}"),
        )
    )
    assert winner(table, "/", query="v=1&v=2") == "one"
    assert winner(table, "/", query="v=2&v=1") == "two"
    assert winner(table, "/", query="V=1") is None
    assert winner(table, "/", query="w=1") is None


def test_method_must_be_equal() -> None:
    table = table_of(BASE + route("r", rule("post", "{method: POST}")))
    assert winner(table, "/", method="POST") == "post"
    assert winner(table, "/", method="GET") is None


# --- attachment (GAMMA) --------------------------------------------------------------------------

GAMMA = (
    services("web", "a", "b", "c", namespace="prod")
    + route(
        "producer", rule("producer", "{path: {value: /p}}"), namespace="prod", parent="name: web"
    )
    + route(
        "consumer",
        rule("consumer", "{path: {value: /c}}"),
        namespace="team",
        parent="name: web, namespace: prod",
    )
    + route(
        "third",
        rule("third", "{path: {value: /t}}"),
        namespace="other",
        parent="name: web, namespace: prod",
    )
)


def test_producer_routes_apply_to_every_caller_without_a_consumer_route() -> None:
    index = RouteIndex(load_text(GAMMA))
    for caller in ("prod", "elsewhere"):
        table = index.table("web.prod", caller, 80)
        assert winner(table, "/p") == "producer"
        assert winner(table, "/c") is None
        assert winner(table, "/t") is None


def test_a_consumer_route_replaces_the_producer_routes_for_its_namespace_only() -> None:
    index = RouteIndex(load_text(GAMMA))
    team = index.table("web.prod", "team", 80)
    assert winner(team, "/c") == "consumer"
    assert winner(team, "/p") is None  # replaced, not merged
    assert winner(team, "/t") is None  # another namespace's consumer route
    other = index.table("web.prod", "other", 80)
    assert winner(other, "/t") == "third"
    assert winner(other, "/c") is None


def test_no_route_attached_means_no_table() -> None:
    index = RouteIndex(load_text(GAMMA))
    assert "a.prod" not in index
    assert index.table("a.prod", "prod", 80) is None


def test_a_parent_port_applies_only_to_calls_dialled_on_it() -> None:
    text = BASE + route("r", rule("p"), parent="name: web, port: 8080")
    index = RouteIndex(load_text(text))
    assert winner(index.table("web.default", "default", 8080), "/") == "p"
    assert index.table("web.default", "default", 80) is None
    assert index.table("web.default", "default", None) is None
    # Two routes, one on a port: the other port sees only the unported one.
    both = text + route("any", rule("any"))
    index = RouteIndex(load_text(both))
    assert winner(index.table("web.default", "default", 9090), "/") == "any"
    assert index.table("web.default", "default", 8080) is not None


def test_the_table_cache_is_bounded_and_answers_past_its_bound() -> None:
    index = RouteIndex(load_text(BASE + route("r", rule("p"))))
    first = index.table("web.default", "default", 1)
    assert index.table("web.default", "default", 1) is first  # cached
    # Ports come from URLs: far more distinct ones than the bound (4096) must not all stay.
    for port in range(2, 6001):
        index.table("web.default", "default", port)
    late = index.table("web.default", "default", 6000)
    assert late is not None and winner(late, "/") == "p"  # still right ...
    assert index.table("web.default", "default", 6000) is not late  # ... but not kept
    assert index.table("web.default", "default", 1) is first


# --- backends by weight --------------------------------------------------------------------------


def test_pick_shares_follow_the_weights_and_weight_zero_is_never_chosen() -> None:
    backends = (
        "    backendRefs:\n"
        "    - {name: a, port: 80, weight: 1}\n"
        "    - {name: b, port: 80, weight: 3}\n"
        "    - {name: c, port: 80, weight: 0}\n"
        "    - {name: ghost, port: 80, weight: 1}\n"  # not declared: its share is a 500
        "    - {name: bucket, kind: Bucket, group: example.com, weight: 2}\n"  # not a Service
    )
    text = BASE + route("r", "  - name: w\n" + backends)
    table = table_of(text)
    assert table is not None
    candidate = table.select("GET", "/", "", {})
    assert candidate is not None
    rng = random.Random(SEED)
    n = 20_000
    counts: Counter[str | None] = Counter()
    for _ in range(n):
        backend = pick(candidate.rule, rng.random)
        assert backend is not None
        counts[backend.service if backend.service else f"invalid:{backend.ref.name}"] += 1
    total = 1 + 3 + 1 + 2
    for key, weight in (
        ("a.default", 1),
        ("b.default", 3),
        ("invalid:ghost", 1),
        ("invalid:bucket", 2),
    ):
        low, high = binomial_bounds(n, weight / total)
        assert low <= counts[key] <= high, (key, counts)
    assert counts["c.default"] == 0


def test_pick_without_weight_has_no_backend() -> None:
    text = BASE + route(
        "r",
        "  - name: zero\n    matches: [{path: {value: /z}}]\n"
        "    backendRefs: [{name: a, port: 80, weight: 0}]\n"
        "  - name: none\n    matches: [{path: {value: /n}}]\n",
    )
    table = table_of(text)
    assert table is not None
    for path in ("/z", "/n"):
        candidate = table.select("GET", path, "", {})
        assert candidate is not None
        assert pick(candidate.rule, random.Random(SEED).random) is None


# --- filters -------------------------------------------------------------------------------------


def prefix_match(value: str) -> RouteMatch:
    return RouteMatch(PathMatch(PathMatchType.PATH_PREFIX, value))


@pytest.mark.parametrize(
    ("request_path", "prefix", "replacement", "expected"),
    [
        # The spec's table (HTTPPathModifier.replacePrefixMatch), minus the empty replacement
        # the loader refuses.
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/foo/bar", "/foo", "/", "/bar"),
        ("/foo", "/", "/xyz", "/xyz/foo"),
    ],
)
def test_replace_prefix_match(
    request_path: str, prefix: str, replacement: str, expected: str
) -> None:
    modifier = PathModifier(PathModifierType.REPLACE_PREFIX_MATCH, replacement)
    assert rewrite_path(modifier, prefix_match(prefix), request_path) == expected


def test_replace_full_path_ignores_the_request_path() -> None:
    modifier = PathModifier(PathModifierType.REPLACE_FULL_PATH, "/one")
    assert rewrite_path(modifier, prefix_match("/a"), "/a/b/c") == "/one"


@pytest.mark.parametrize(
    ("redirect", "scheme", "port", "expected"),
    [
        # No scheme, no port: the request's port stays.
        (RequestRedirect(), "http", 8080, "http://web:8080/p?q=1"),
        (RequestRedirect(), "https", None, "https://web/p?q=1"),
        (RequestRedirect(hostname="other"), "http", 8080, "http://other:8080/p?q=1"),
        # A scheme given without a port: that scheme's well-known port, omitted.
        (RequestRedirect(scheme="https"), "http", 8080, "https://web/p?q=1"),
        (RequestRedirect(scheme="http"), "https", 8443, "http://web/p?q=1"),
        (RequestRedirect(scheme="https"), "https", 8443, "https://web/p?q=1"),
        # A port given: kept unless it is the scheme's well-known one.
        (RequestRedirect(scheme="https", port=443), "http", 8080, "https://web/p?q=1"),
        (RequestRedirect(port=80), "http", 8080, "http://web/p?q=1"),
        (RequestRedirect(port=443), "http", 8080, "http://web:443/p?q=1"),
        (RequestRedirect(scheme="https", port=8443), "http", None, "https://web:8443/p?q=1"),
    ],
)
def test_redirect_location_ports(
    redirect: RequestRedirect, scheme: str, port: int | None, expected: str
) -> None:
    location = redirect_location(redirect, prefix_match("/"), scheme, "web", port, "/p", "q=1")
    assert location == expected


def test_redirect_prefix_replaced_by_slash_on_the_bare_prefix_gives_slash() -> None:
    redirect = RequestRedirect(path=PathModifier(PathModifierType.REPLACE_PREFIX_MATCH, "/"))
    match = prefix_match("/old")
    assert redirect_location(redirect, match, "http", "web", None, "/old", "") == "http://web/"
    assert redirect_location(redirect, match, "http", "web", None, "/old/x", "a=b") == (
        "http://web/x?a=b"
    )


def test_request_edit_joins_the_rule_and_backend_filters() -> None:
    text = BASE + route(
        "r",
        "  - name: e\n    matches: [{path: {value: /old}}]\n"
        "    filters:\n"
        "    - type: URLRewrite\n"
        "      urlRewrite: {hostname: new.example, path: {type: ReplacePrefixMatch,"
        " replacePrefixMatch: /new}}\n"
        "    - type: RequestHeaderModifier\n"
        "      requestHeaderModifier: {set: [{name: X-Rule, value: '1'}]}\n"
        "    backendRefs:\n"
        "    - name: a\n      port: 80\n      filters:\n"
        "      - type: RequestHeaderModifier\n"
        "        requestHeaderModifier: {add: [{name: X-Backend, value: '2'}]}\n",
    )
    table = table_of(text)
    assert table is not None
    candidate = table.select("GET", "/old/x", "", {})
    assert candidate is not None
    backend = pick(candidate.rule, random.Random(SEED).random)
    edit = request_edit(candidate, backend, "/old/x")
    assert edit.path == "/new/x" and edit.host == "new.example"
    pairs = edit_headers([("x-rule", "0")], edit.headers)
    assert pairs == [("x-rule", "1"), ("x-backend", "2")]


def test_edit_headers_set_add_remove_are_case_insensitive_on_names() -> None:
    pairs = [("X-A", "1"), ("x-a", "2"), ("Keep", "k"), ("X-Gone", "g"), ("x-GONE", "h")]
    modifier = HeaderModifier(set=(("x-a", "new"),), add=(("keep", "more"),), remove=("X-gone",))
    assert edit_headers(pairs, [modifier]) == [("Keep", "k"), ("x-a", "new"), ("keep", "more")]
    # Modifiers apply in order: a later one sees the earlier one's result.
    later = HeaderModifier(remove=("KEEP",), add=(("X-A", "again"),))
    assert edit_headers(pairs, [modifier, later]) == [("x-a", "new"), ("X-A", "again")]
    # Values are kept as given (case-sensitive).
    assert edit_headers([("v", "MiXeD")], [HeaderModifier(add=(("w", "CaSe"),))]) == [
        ("v", "MiXeD"),
        ("w", "CaSe"),
    ]


def test_an_empty_matches_list_matches_every_request_as_a_missing_one_does() -> None:
    # Implementations read `matches: []` as no matches given: PathPrefix "/" (Go cannot tell
    # an empty list from a missing one); a rule that matches nothing would be silently dead.
    text = BASE + route(
        "r",
        "  - name: empty\n    matches: []\n    backendRefs: [{name: a, port: 80}]\n"
        + rule("exact", "{path: {type: Exact, value: /x}}"),
    )
    table = table_of(text)
    assert winner(table, "/anything", method="DELETE") == "empty"
    assert winner(table, "/x") == "exact"  # and it ranks as PathPrefix "/", last


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [
        ("/items/[0-9]+", "/items/"),
        ("/exact", "/exact"),
        ("/ab?c", "/a"),  # b is optional: not part of the prefix
        ("/ab*", "/a"),
        ("/ab+", "/a"),
        ("/a{2}", "/"),
        ("/a|/b", ""),  # alternation: no prefix at all
        ("(?i)/api", ""),
        ("/v1\\.0/x", "/v1"),
        (".*", ""),
    ],
)
def test_a_regex_literal_prefix_is_conservative(pattern: str, literal: str) -> None:
    from meshlib.config.values import compile_regex
    from meshlib.policy.routes import regex_literal_prefix

    assert regex_literal_prefix(pattern) == literal
    compiled = compile_regex(f"(?:{pattern})$")
    for path in ("/items/12", "/exact", "/ac", "/abbbc", "/aa", "/b", "/API", "/v1.0/x", "/"):
        if compiled.match(path) is not None:  # the prefilter never hides a real match
            assert path.startswith(literal), (pattern, path)
