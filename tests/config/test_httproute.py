"""Gateway API HTTPRoute (v1) documents: the model they parse into, the spec's defaults, and one
error per limit or bad value, each naming file, line and field (issue 14, before wiring)."""

from __future__ import annotations

import textwrap

import pytest

from meshlib.config.httproute import parse_gateway_duration, parse_http_route
from meshlib.config.model import (
    BackendRef,
    FilterType,
    HeaderModifier,
    HTTPRoute,
    HTTPRouteFilter,
    HTTPRouteRule,
    Origin,
    ParentMode,
    ParentRef,
    PathMatch,
    PathMatchType,
    PathModifier,
    PathModifierType,
    RequestMirror,
    RequestRedirect,
    RouteMatch,
    RouteTimeouts,
    URLRewrite,
    ValueMatch,
    ValueMatchType,
)
from meshlib.config.yamlsafe import read_documents
from meshlib.errors import ConfigError, Problem

FULL = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  namespace: shop
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: reviews
    port: 9080
  - name: edge
    namespace: infra
    sectionName: https
  hostnames: [reviews.example.com, "*.example.org"]
  rules:
  - name: canary
    matches:
    - path: {type: Exact, value: /api/v2}
      headers:
      - {name: X-Canary, value: "yes"}
      - {type: RegularExpression, name: user-agent, value: ".*Firefox.*"}
      queryParams:
      - {name: debug, value: "1"}
      method: GET
    - path: {type: RegularExpression, value: "/items/[0-9]+"}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Route, value: canary}]
        add: [{name: X-Trace, value: "1"}]
        remove: [X-Debug]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {remove: [Server]}
    - type: RequestMirror
      requestMirror:
        backendRef: {name: shadow, port: 8080}
        fraction: {numerator: 1, denominator: 4}
    backendRefs:
    - {name: reviews-v2, port: 9080, weight: 90}
    - {name: reviews-v1, namespace: legacy, port: 9080, weight: 10}
    timeouts: {request: 10s, backendRequest: 500ms}
  - matches:
    - path: {value: /old}
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: new.example.com
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: Exact, value: /gone}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        hostname: www.example.com
        port: 443
        statusCode: 301
        path: {type: ReplaceFullPath, replaceFullPath: /here}
"""


def parse(text: str) -> HTTPRoute:
    docs, yaml_problems = read_documents(text)
    assert not yaml_problems
    return parse_http_route("route.yaml", docs[0])


def route(spec: str, *, name: str = "r") -> str:
    """A document whose spec is ``spec`` (dedented); the spec's first line is line 5."""
    body = textwrap.indent(textwrap.dedent(spec).strip("\n"), "  ")
    return (
        "apiVersion: gateway.networking.k8s.io/v1\n"
        "kind: HTTPRoute\n"
        f"metadata: {{name: {name}}}\n"
        "spec:\n"
        f"{body}\n"
    )


def problems(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return list(info.value.problems)


def one_problem(text: str, field: str, line: int, words: str) -> Problem:
    """The single problem, at ``route.yaml:line`` on ``field``, whose message holds ``words``."""
    found = problems(text)
    assert len(found) == 1, [str(p) for p in found]
    p = found[0]
    assert (p.file, p.line, p.field) == ("route.yaml", line, field), str(p)
    assert words in p.message, str(p)
    assert str(p).startswith(f"route.yaml:{line}"), str(p)
    return p


def test_full_example_parses_into_the_model() -> None:
    r = parse(FULL)
    assert (r.name, r.namespace, r.origin) == ("reviews", "shop", Origin("route.yaml", 1, 1))
    assert r.parent_refs == (
        ParentRef("reviews", "shop", "", "Service", None, 9080),
        ParentRef("edge", "infra", "gateway.networking.k8s.io", "Gateway", "https", None),
    )
    assert [p.mode for p in r.parent_refs] == [ParentMode.MESH, ParentMode.INGRESS]
    assert r.hostnames == ("reviews.example.com", "*.example.org")
    canary, rewrite, redirect = r.rules
    assert canary.name == "canary"
    assert canary.matches[0] == RouteMatch(
        PathMatch(PathMatchType.EXACT, "/api/v2"),
        (
            ValueMatch("x-canary", "yes"),
            ValueMatch("user-agent", ".*Firefox.*", ValueMatchType.REGULAR_EXPRESSION),
        ),
        (ValueMatch("debug", "1"),),
        "GET",
    )
    agent = canary.matches[0].headers[1].regex
    assert agent is not None and agent.match("Mozilla Firefox/120") is not None
    items = canary.matches[1].path
    assert items.type is PathMatchType.REGULAR_EXPRESSION and items.regex is not None
    assert items.regex.match("/items/42") is not None
    assert items.regex.match("/items/42/more") is None  # the whole path must match
    assert canary.filters == (
        HTTPRouteFilter(
            FilterType.REQUEST_HEADER_MODIFIER,
            HeaderModifier((("x-route", "canary"),), (("x-trace", "1"),), ("x-debug",)),
        ),
        HTTPRouteFilter(FilterType.RESPONSE_HEADER_MODIFIER, HeaderModifier(remove=("server",))),
        HTTPRouteFilter(
            FilterType.REQUEST_MIRROR, RequestMirror(BackendRef("shadow", "shop", 8080), 25.0)
        ),
    )
    assert canary.backend_refs == (
        BackendRef("reviews-v2", "shop", 9080, 90),
        BackendRef("reviews-v1", "legacy", 9080, 10),
    )
    assert canary.timeouts == RouteTimeouts(10.0, 0.5)
    assert rewrite.matches == (RouteMatch(PathMatch(PathMatchType.PATH_PREFIX, "/old")),)
    assert rewrite.filters == (
        HTTPRouteFilter(
            FilterType.URL_REWRITE,
            URLRewrite(
                "new.example.com", PathModifier(PathModifierType.REPLACE_PREFIX_MATCH, "/new")
            ),
        ),
    )
    assert redirect.filters[0].config == RequestRedirect(
        "https",
        "www.example.com",
        PathModifier(PathModifierType.REPLACE_FULL_PATH, "/here"),
        443,
        301,
    )


# --- defaults --------------------------------------------------------------------------------


def test_no_rules_is_one_rule_matching_every_path() -> None:
    r = parse(route("parentRefs: [{name: edge}]"))
    assert len(r.rules) == 1
    assert r.rules[0].matches == (RouteMatch(PathMatch(PathMatchType.PATH_PREFIX, "/")),)
    assert r.rules[0].backend_refs == ()


def test_rule_without_matches_matches_path_prefix_slash() -> None:
    r = parse(route("rules: [{backendRefs: [{name: a, port: 80}]}]"))
    assert r.rules[0].matches == (RouteMatch(PathMatch(PathMatchType.PATH_PREFIX, "/")),)


def test_path_type_defaults_to_path_prefix() -> None:
    r = parse(route("rules: [{matches: [{path: {value: /api}}]}]"))
    assert r.rules[0].matches[0].path == PathMatch(PathMatchType.PATH_PREFIX, "/api")


def test_path_value_defaults_to_slash() -> None:
    r = parse(route("rules: [{matches: [{path: {type: Exact}}]}]"))
    assert r.rules[0].matches[0].path == PathMatch(PathMatchType.EXACT, "/")


def test_match_without_path_is_path_prefix_slash() -> None:
    r = parse(route("rules: [{matches: [{method: POST}]}]"))
    assert r.rules[0].matches[0] == RouteMatch(PathMatch(), method="POST")


def test_header_match_type_defaults_to_exact() -> None:
    r = parse(route("rules: [{matches: [{headers: [{name: A, value: b}]}]}]"))
    assert r.rules[0].matches[0].headers == (ValueMatch("a", "b", ValueMatchType.EXACT),)


def test_backend_weight_defaults_to_one_and_namespace_to_the_routes() -> None:
    r = parse(route("rules: [{backendRefs: [{name: a, port: 80}]}]"))
    assert r.rules[0].backend_refs == (BackendRef("a", "default", 80, 1),)


def test_parent_defaults_to_a_gateway_in_the_routes_namespace() -> None:
    r = parse(route("parentRefs: [{name: edge}]"))
    (p,) = r.parent_refs
    assert (p.group, p.kind, p.namespace, p.mode) == (
        "gateway.networking.k8s.io",
        "Gateway",
        "default",
        ParentMode.INGRESS,
    )


def test_redirect_status_defaults_to_302_and_mirror_to_every_request() -> None:
    r = parse(
        route("""
            rules:
            - filters:
              - {type: RequestRedirect, requestRedirect: {scheme: https}}
            - filters:
              - {type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}}}
            """)
    )
    assert r.rules[0].filters[0].config == RequestRedirect(scheme="https", status_code=302)
    mirror = r.rules[1].filters[0].config
    assert isinstance(mirror, RequestMirror) and mirror.percent == 100.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("1h", 3600.0),
        ("1m30s", 90.0),
        ("0s", 0.0),
        ("1h2m3s4ms", 3723.004),
    ],
)
def test_gateway_durations(text: str, seconds: float) -> None:
    assert parse_gateway_duration(text) == seconds


@pytest.mark.parametrize("text", ["1.5s", "-1s", "10", "100000s", "1h1m1s1ms1h", "1d", "", " 1s"])
def test_gateway_durations_refused(text: str) -> None:
    with pytest.raises(ValueError, match="Gateway API duration"):
        parse_gateway_duration(text)


def test_zero_request_timeout_disables_it_and_allows_any_backend_timeout() -> None:
    r = parse(route("rules: [{timeouts: {request: 0s, backendRequest: 1h}}]"))
    assert r.rules[0].timeouts == RouteTimeouts(0.0, 3600.0)


# --- limits ----------------------------------------------------------------------------------


def _many(key: str, n: int, item: str) -> str:
    return f"{key}: [{', '.join(item.format(i=i) for i in range(n))}]"


def test_limits_allow_the_maximum() -> None:
    r = parse(
        route(
            "\n".join(
                [
                    _many("parentRefs", 16, "{{name: g{i}}}"),
                    _many("hostnames", 16, "h{i}.example.com"),
                    "rules:",
                    "- " + _many("backendRefs", 16, "{{name: b{i}, port: 80}}"),
                    "  " + _many("matches", 64, "{{path: {{value: /p{i}}}}}"),
                ]
                + ["- {}"] * 15
            )
        )
    )
    assert (len(r.parent_refs), len(r.hostnames), len(r.rules)) == (16, 16, 16)
    assert (len(r.rules[0].backend_refs), len(r.rules[0].matches)) == (16, 64)


@pytest.mark.parametrize(
    ("spec", "field", "line"),
    [
        (_many("parentRefs", 17, "{{name: g{i}}}"), "spec.parentRefs", 5),
        (_many("hostnames", 17, "h{i}.example.com"), "spec.hostnames", 5),
        ("rules:\n" + "- {}\n" * 17, "spec.rules", 5),
        ("rules:\n- " + _many("matches", 65, "{{}}"), "spec.rules[0].matches", 6),
        (
            "rules:\n- " + _many("backendRefs", 17, "{{name: b{i}, port: 80}}"),
            "spec.rules[0].backendRefs",
            6,
        ),
        (
            "rules:\n- matches:\n  - " + _many("headers", 17, "{{name: h{i}, value: v}}"),
            "spec.rules[0].matches[0].headers",
            7,
        ),
        (
            "rules:\n- matches:\n  - " + _many("queryParams", 17, "{{name: q{i}, value: v}}"),
            "spec.rules[0].matches[0].queryParams",
            7,
        ),
        (
            "rules:\n- filters:\n  - type: RequestHeaderModifier\n    requestHeaderModifier:\n"
            "      " + _many("set", 17, "{{name: h{i}, value: v}}"),
            "spec.rules[0].filters[0].requestHeaderModifier.set",
            9,
        ),
    ],
)
def test_each_limit_is_its_own_error(spec: str, field: str, line: int) -> None:
    one_problem(route(spec), field, line, "items, at most")


def test_total_matches_over_all_rules_is_limited() -> None:
    rules = "rules:\n" + ("- " + _many("matches", 64, "{{}}") + "\n") * 3
    one_problem(route(rules), "spec.rules", 5, "192 matches in all, at most 128")


def test_backend_of_another_kind_is_kept_as_unresolvable() -> None:
    r = parse(
        route("rules: [{backendRefs: [{name: a, kind: Pod, weight: 2}, {name: b, port: 80}]}]")
    )
    pod, service = r.rules[0].backend_refs
    assert pod == BackendRef("a", "default", None, 2, "", "Pod")
    assert (pod.resolvable, service.resolvable) == (False, True)


# --- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "words"),
    [
        ("Foo.example.com", "not a valid hostname"),
        ("foo_bar.example.com", "not a valid hostname"),
        ("*", "not a valid hostname"),
        ("a.*.example.com", "not a valid hostname"),
        ("-a.example.com", "not a valid hostname"),
        ("10.0.0.1", "is an IP address"),
    ],
)
def test_bad_hostname(host: str, words: str) -> None:
    one_problem(route(f"hostnames:\n- ok.example.com\n- '{host}'"), "spec.hostnames[1]", 7, words)


@pytest.mark.parametrize("kind", ["Exact", "PathPrefix"])
@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("api", "must start with '/'"),
        ("/a//b", "must not contain '//'"),
        ("/a/../b", "must not contain '/../'"),
        ("/a%2Fb", "must not contain '%2F'"),
        ("/a#b", "must not contain '#'"),
        ("/a/..", "must not end with"),
    ],
)
def test_bad_path(kind: str, value: str, words: str) -> None:
    text = route(f"rules:\n- matches:\n  - path:\n      type: {kind}\n      value: '{value}'")
    p = one_problem(text, "spec.rules[0].matches[0].path.value", 9, words)
    assert kind in p.message


def test_bad_path_regex_is_refused_by_re2() -> None:
    text = route("rules:\n- matches:\n  - path: {type: RegularExpression, value: '(?=x)/a'}")
    p = one_problem(text, "spec.rules[0].matches[0].path.value", 7, "not supported by RE2")
    assert "'(?=x)/a'" in p.message  # the user's pattern, not the anchored wrapper


def test_bad_header_regex_is_refused_by_re2() -> None:
    text = route(
        "rules:\n- matches:\n  - headers:\n    - {type: RegularExpression, name: a, value: '(a'}"
    )
    one_problem(text, "spec.rules[0].matches[0].headers[0].value", 8, "not supported by RE2")


def test_duplicate_header_in_one_match_is_refused_case_insensitively() -> None:
    text = route(
        "rules:\n- matches:\n  - headers:\n"
        "    - {name: X-A, value: '1'}\n    - {name: x-a, value: '2'}"
    )
    one_problem(text, "spec.rules[0].matches[0].headers[1].name", 9, "matched twice")


def test_same_header_in_two_matches_is_fine() -> None:
    r = parse(
        route(
            "rules:\n- matches:\n  - headers: [{name: a, value: '1'}]\n"
            "  - headers: [{name: a, value: '2'}]"
        )
    )
    assert len(r.rules[0].matches) == 2


def test_duplicate_query_param_is_refused_case_sensitively() -> None:
    text = route(
        "rules:\n- matches:\n  - queryParams:\n    - {name: q, value: '1'}\n"
        "    - {name: Q, value: '2'}\n    - {name: q, value: '3'}"
    )
    one_problem(text, "spec.rules[0].matches[0].queryParams[2].name", 10, "matched twice")


@pytest.mark.parametrize(
    ("spec", "field", "line", "words"),
    [
        ("hostnames: [a.com]\nhostname: [b.com]", "spec.hostname", 6, "did you mean 'hostnames'"),
        ("rules:\n- matchs: []", "spec.rules[0].matchs", 6, "did you mean 'matches'"),
        (
            "rules:\n- matches:\n  - path: {kind: Exact}",
            "spec.rules[0].matches[0].path.kind",
            7,
            "unknown field",
        ),
        (
            "rules:\n- backendRefs: [{name: a, port: 80, wieght: 3}]",
            "spec.rules[0].backendRefs[0].wieght",
            6,
            "did you mean 'weight'",
        ),
        (
            "parentRefs: [{name: g, sectionname: x}]",
            "spec.parentRefs[0].sectionname",
            5,
            "did you mean 'sectionName'",
        ),
    ],
)
def test_unknown_fields_are_refused(spec: str, field: str, line: int, words: str) -> None:
    one_problem(route(spec), field, line, words)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("1.5s", "not a Gateway API duration"),
        ("10", "not a Gateway API duration"),
        ("-1s", "not a Gateway API duration"),
        ("1d", "not a Gateway API duration"),
        ("123456s", "not a Gateway API duration"),
    ],
)
def test_bad_timeout(value: str, words: str) -> None:
    one_problem(
        route(f"rules:\n- timeouts:\n    request: '{value}'"),
        "spec.rules[0].timeouts.request",
        7,
        words,
    )


def test_backend_timeout_longer_than_request_timeout_is_refused() -> None:
    text = route("rules:\n- timeouts:\n    request: 1s\n    backendRequest: 2s")
    one_problem(text, "spec.rules[0].timeouts.backendRequest", 8, "longer than request")


@pytest.mark.parametrize(
    ("spec", "field", "line", "words"),
    [
        (
            "rules:\n- matches: [{path: {type: Prefix}}]",
            "spec.rules[0].matches[0].path.type",
            6,
            "did you mean 'PathPrefix'",
        ),
        (
            "rules:\n- matches: [{method: FETCH}]",
            "spec.rules[0].matches[0].method",
            6,
            "not one of",
        ),
        (
            "rules:\n- backendRefs: [{name: a, port: 80, weight: -1}]",
            "spec.rules[0].backendRefs[0].weight",
            6,
            "at least 0",
        ),
        (
            "rules:\n- backendRefs: [{name: a, port: 80, weight: 1000001}]",
            "spec.rules[0].backendRefs[0].weight",
            6,
            "at most 1000000",
        ),
        (
            "rules:\n- backendRefs: [{name: a}]",
            "spec.rules[0].backendRefs[0].port",
            6,
            "needs port",
        ),
        ("parentRefs: [{name: g, kind: Mesh}]", "spec.parentRefs[0].kind", 5, "not supported"),
        ("parentRefs: [{name: g, port: 0}]", "spec.parentRefs[0].port", 5, "at least 1"),
        ("rules:\n- name: a\n- name: a", "spec.rules[1].name", 7, "used twice"),
        ("rules:\n- name: Bad_Name", "spec.rules[0].name", 6, "is not a string matching"),
        (
            "rules:\n- matches: [{headers: [{name: 'a b', value: x}]}]",
            "spec.rules[0].matches[0].headers[0].name",
            6,
            "not an HTTP header name",
        ),
    ],
)
def test_bad_values(spec: str, field: str, line: int, words: str) -> None:
    one_problem(route(spec), field, line, words)


@pytest.mark.parametrize(
    ("filters", "field", "line", "words"),
    [
        (
            "- {type: RequestHeaderModifier}",
            "spec.rules[0].filters[0]",
            7,
            "needs requestHeaderModifier",
        ),
        ("- {type: ExtensionRef}", "spec.rules[0].filters[0].type", 7, "not one of"),
        (
            "- {type: URLRewrite, requestRedirect: {scheme: https}}",
            "spec.rules[0].filters[0].requestRedirect",
            7,
            "takes only urlRewrite",
        ),
        (
            "- {type: RequestHeaderModifier, requestHeaderModifier: {remove: [a]}}\n"
            "  - {type: RequestHeaderModifier, requestHeaderModifier: {remove: [b]}}",
            "spec.rules[0].filters[1].type",
            8,
            "given twice",
        ),
        (
            "- {type: RequestRedirect, requestRedirect: {scheme: https}}\n"
            "  - {type: URLRewrite, urlRewrite: {hostname: a.com}}",
            "spec.rules[0].filters",
            6,
            "cannot be used together",
        ),
        (
            "- {type: RequestRedirect, requestRedirect: {statusCode: 404}}",
            "spec.rules[0].filters[0].requestRedirect.statusCode",
            7,
            "not one of",
        ),
        (
            "- {type: URLRewrite, urlRewrite: {hostname: '*.a.com'}}",
            "spec.rules[0].filters[0].urlRewrite.hostname",
            7,
            "not a valid hostname",
        ),
        (
            "- {type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath}}}",
            "spec.rules[0].filters[0].urlRewrite.path",
            7,
            "needs replaceFullPath",
        ),
        (
            "- type: URLRewrite\n"
            "    urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /x}}",
            "spec.rules[0].filters",
            6,
            "exactly one match",
        ),
        (
            "- type: RequestMirror\n    requestMirror:\n      backendRef: {name: m, port: 80}\n"
            "      fraction: {numerator: 5, denominator: 4}",
            "spec.rules[0].filters[0].requestMirror.fraction.numerator",
            10,
            "larger than the denominator",
        ),
        (
            "- type: RequestMirror\n    requestMirror:\n      backendRef: {name: m, port: 80}\n"
            "      percent: 10\n      fraction: {numerator: 1}",
            "spec.rules[0].filters[0].requestMirror.fraction",
            11,
            "not both",
        ),
        (
            "- type: RequestHeaderModifier\n    requestHeaderModifier:\n"
            "      set: [{name: A, value: '1'}, {name: a, value: '2'}]",
            "spec.rules[0].filters[0].requestHeaderModifier.set[1].name",
            9,
            "listed twice",
        ),
    ],
)
def test_bad_filters(filters: str, field: str, line: int, words: str) -> None:
    spec = "rules:\n- matches: [{path: {type: Exact, value: /a}}]\n  filters:\n  " + filters
    one_problem(route(spec), field, line + 1, words)


def test_every_problem_is_reported_at_once() -> None:
    text = route(
        "hostnames: ['Bad']\nrules:\n- matches: [{path: {value: x}}]\n  timeouts: {request: 1.5s}"
    )
    assert [(p.line, p.field) for p in problems(text)] == [
        (5, "spec.hostnames[0]"),
        (7, "spec.rules[0].matches[0].path.value"),
        (8, "spec.rules[0].timeouts.request"),
    ]


def test_wrong_api_version_and_missing_spec() -> None:
    text = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata: {name: r}\n"
    found = {(p.line, p.field) for p in problems(text)}
    assert found == {(1, "apiVersion"), (1, "spec")}


@pytest.mark.parametrize(
    "item",
    [
        "parentRefs: [{group: '', kind: Service, name: 7}]",  # a parent dropped
        "parentRefs: [{group: '', kind: Service, name: reviews}, {name: [x]}]",
        "rules: [{backendRefs: [{name: 7, port: 80}]}]",  # a backend dropped
        "rules: [{backendRefs: [{name: reviews, port: 80, weight: x}]}]",
        "rules: [{filters: [{type: Nope}]}]",  # a filter dropped
        # a mapping where an enum's string goes (a mapping is not hashable)
        "rules: [{matches: [{path: {type: {a: 1}, value: /}}]}]",
        "rules: [{matches: [{headers: [{name: x, value: y, type: {a: 1}}]}]}]",
        "rules: [{filters: [{type: {a: 1}}]}]",
        "rules: [{filters: [{type: URLRewrite, urlRewrite: {path: {type: {a: 1}}}}]}]",
    ],
)
def test_a_structurally_wrong_route_is_reported_in_the_loader_not_an_internal_error(
    item: str,
) -> None:
    """A value the structural check refuses is skipped by the builder; a route built anyway has
    fewer items than its manifest, and the reference checks (which pair them by position) used
    to fail with an internal error instead of the file's own problems (found by the docs
    examples' fuzz test, tests/config/test_cfg_fuzz.py)."""
    from meshlib.config.loader import INTERNAL_ERROR, load_text

    text = (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n"
        f"spec:\n  {item}\n---\n"
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_text(text, source="bad.yaml")
    messages = [p.message for p in caught.value.problems]
    assert not any(INTERNAL_ERROR in m for m in messages), messages
    assert all(p.file == "bad.yaml" and p.line >= 1 and p.field for p in caught.value.problems)


def test_a_route_without_rules_loads_with_the_spec_default_rule() -> None:
    """``rules`` is optional (the spec's default: one rule matching every path, no backends);
    the reference checks used to pair the manifest's rules (none) with the model's (one) and
    fail with an internal error."""
    from meshlib.config.loader import load_text

    snapshot = load_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n"
        "spec:\n  parentRefs: [{group: '', kind: Service, name: reviews}]\n---\n"
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\n"
    )
    (route,) = snapshot.http_routes
    assert route.rules == (HTTPRouteRule(),)
