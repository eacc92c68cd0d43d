"""The Gateway API ``HTTPRoute`` kind (gateway.networking.k8s.io/v1): its JSON Schema and its
builder, with the spec's defaults and limits. The frozen model is in :mod:`meshlib.config.model`
(so the data plane reads it without loading YAML); the routing is :mod:`meshlib.policy.routes`.

A parent of kind ``Service`` attaches the route to a mesh service (GAMMA, mesh mode); a parent of
kind ``Gateway`` attaches it to an ingress gateway. Structure (field names, types, enums) is
checked by the loader's schema checker, so unknown fields are refused with the same messages as
every other kind; the builder then applies defaults and the spec's limits and cross-field rules
(the CEL rules of the upstream CRD), each problem naming file, line and field path.
"""

from __future__ import annotations

import ipaddress
import re

from meshlib.config.checker import document_findings, passes
from meshlib.config.documents import (
    DEFAULT_NAMESPACE,
    DocContext,
    as_int,
    as_str,
    at,
    limited,
    limited_maps,
)
from meshlib.config.fragments import (
    GATEWAY_API,
    STRING,
    Schema,
    array,
    enum as enum_schema,
    integer,
    obj,
)
from meshlib.config.model import (
    GATEWAY_GROUP,
    FilterConfig,
    FilterType,
    HeaderModifier,
    PathMatchType,
    PathModifierType,
    Pattern,
    RequestMirror,
    RequestRedirect,
    URLRewrite,
    ValueMatchType,
)
from meshlib.config.routemodel import (
    BackendRef,
    HTTPRoute,
    HTTPRouteFilter,
    HTTPRouteRule,
    ParentRef,
    PathMatch,
    PathModifier,
    RouteMatch,
    RouteTimeouts,
    ValueMatch,
)
from meshlib.config.values import compile_regex, shown
from meshlib.config.yamlsafe import YamlDocument, YMap, YSeq
from meshlib.errors import ConfigError, Problem

#: The spec's list limits (``maxItems`` in the upstream CRD).
MAX_PARENT_REFS = 16
MAX_HOSTNAMES = 16
MAX_RULES = 16
MAX_MATCHES = 64
#: Upstream CEL rule: 16 rules of 64 matches are allowed, but not more than 128 in all.
MAX_TOTAL_MATCHES = 128
MAX_HEADER_MATCHES = 16
MAX_QUERY_MATCHES = 16
MAX_BACKEND_REFS = 16
MAX_FILTERS = 16
MAX_HEADER_MODIFICATIONS = 16
MAX_BACKEND_WEIGHT = 1_000_000
MAX_PATH_LENGTH = 1024
MAX_HEADER_VALUE_LENGTH = 4096
REDIRECT_STATUS_CODES = (301, 302, 303, 307, 308)

#: GEP-2257 duration: 1 to 4 parts of up to 5 digits with a unit h, m, s or ms; no fractions.
_GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
#: RFC 1123 host name, lower case, optionally a leading ``*.`` wildcard label (spec Hostname).
_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: RFC 3339 UTC time as Kubernetes writes it (``metav1.Time``): second precision, ``Z``.
_RFC3339 = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
_SECTION_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$"
#: Upstream CEL rules on Exact and PathPrefix values: what a normalised path cannot contain.
_PATH_FORBIDDEN = ("//", "/./", "/../", "%2f", "%2F", "#")
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
#: The enums' values; a YAML value is tested for ``str`` first (a mapping is not hashable).
_PATH_TYPES = frozenset(t.value for t in PathMatchType)
_VALUE_TYPES = frozenset(t.value for t in ValueMatchType)
_FILTER_TYPES = frozenset(t.value for t in FilterType)
_MODIFIER_TYPES = frozenset(t.value for t in PathModifierType)


# --- schema: structure only; limits and cross-field rules are the builder's ---------------------


def http_route_schema() -> Schema:
    """The whole ``HTTPRoute`` document, closed at every level (unknown fields are errors)."""
    name: Schema = {"type": "string", "minLength": 1, "maxLength": 253}
    port = integer(1, 65535)
    parent = obj(
        {
            "group": {"type": "string", "maxLength": 253},
            "kind": {"type": "string", "minLength": 1, "maxLength": 63},
            "namespace": {"$ref": "#/$defs/namespace"},
            "name": name,
            "sectionName": {"type": "string", "pattern": _SECTION_NAME, "maxLength": 253},
            "port": port,
        },
        "name",
    )
    object_ref: dict[str, Schema] = {
        "group": {"type": "string", "maxLength": 253},
        "kind": {"type": "string", "minLength": 1, "maxLength": 63},
        "name": name,
        "namespace": {"$ref": "#/$defs/namespace"},
        "port": port,
    }
    header_name = {
        "type": "string",
        "title": "an HTTP header name",
        "pattern": _HEADER_NAME,
        "maxLength": 256,
    }
    name_value = obj(
        {"name": header_name, "value": {"type": "string", "maxLength": MAX_HEADER_VALUE_LENGTH}},
        "name",
        "value",
    )
    header_modifier = obj(
        {"set": array(name_value), "add": array(name_value), "remove": array(header_name)}
    )
    path_modifier = obj(
        {
            "type": enum_schema("ReplaceFullPath", "ReplacePrefixMatch"),
            "replaceFullPath": {"type": "string", "maxLength": MAX_PATH_LENGTH},
            "replacePrefixMatch": {"type": "string", "maxLength": MAX_PATH_LENGTH},
        },
        "type",
    )
    hostname = {"type": "string", "minLength": 1, "maxLength": 253}
    filter_ = obj(
        {
            "type": enum_schema(*(t.value for t in FilterType)),
            "requestHeaderModifier": header_modifier,
            "responseHeaderModifier": header_modifier,
            "requestMirror": obj(
                {
                    "backendRef": obj(dict(object_ref), "name"),
                    "percent": integer(0, 100),
                    "fraction": obj(
                        {"numerator": integer(0), "denominator": integer(1)}, "numerator"
                    ),
                },
                "backendRef",
            ),
            "requestRedirect": obj(
                {
                    "scheme": enum_schema("http", "https"),
                    "hostname": hostname,
                    "path": path_modifier,
                    "port": port,
                    "statusCode": {"type": "integer", "enum": list(REDIRECT_STATUS_CODES)},
                }
            ),
            "urlRewrite": obj({"hostname": hostname, "path": path_modifier}),
        },
        "type",
    )
    value_match = obj(
        {
            "type": enum_schema("Exact", "RegularExpression"),
            "name": header_name,
            "value": {"type": "string", "maxLength": MAX_HEADER_VALUE_LENGTH},
        },
        "name",
        "value",
    )
    match = obj(
        {
            "path": obj(
                {
                    "type": enum_schema(*(t.value for t in PathMatchType)),
                    "value": {"type": "string", "maxLength": MAX_PATH_LENGTH},
                }
            ),
            "headers": array(value_match),
            "queryParams": array(value_match),
            "method": enum_schema(*_METHODS),
        }
    )
    backend = obj(
        {
            **object_ref,
            "weight": integer(0, MAX_BACKEND_WEIGHT),
            "filters": array(filter_),
        },
        "name",
    )
    gateway_duration = {
        "type": "string",
        "title": "a Gateway API duration such as '10s', '500ms', '1h' or '1m30s'",
        "pattern": _GATEWAY_DURATION.pattern,
    }
    rule = obj(
        {
            "name": {"type": "string", "pattern": _SECTION_NAME, "maxLength": 253},
            "matches": array(match),
            "filters": array(filter_),
            "backendRefs": array(backend),
            "timeouts": obj({"request": gateway_duration, "backendRequest": gateway_duration}),
        }
    )
    spec = obj(
        {
            "parentRefs": array(parent),
            "hostnames": array(STRING),
            "rules": array(rule),
        }
    )
    metadata = obj(
        {
            "name": {"$ref": "#/$defs/name"},
            "namespace": {"$ref": "#/$defs/namespace"},
            "labels": {"type": "object", "additionalProperties": STRING},
            "annotations": {"type": "object", "additionalProperties": STRING},
            # What `kubectl get -o yaml` adds: accepted so an exported route loads unchanged;
            # only creationTimestamp is read (a route's age breaks precedence ties).
            "creationTimestamp": {
                "type": "string",
                "title": "an RFC 3339 time such as 2024-05-01T10:00:00Z",
                "pattern": _RFC3339.pattern,
            },
            "uid": STRING,
            "resourceVersion": STRING,
            "generation": integer(0),
        },
        "name",
    )
    return obj(
        {
            "apiVersion": {"const": GATEWAY_API},
            "kind": {"const": "HTTPRoute"},
            "metadata": metadata,
            "spec": spec,
        },
        "apiVersion",
        "kind",
        "metadata",
        "spec",
    )


_SCHEMA = http_route_schema()


def parse_http_route(file: str, document: YamlDocument) -> HTTPRoute:
    """One parsed YAML document (as :func:`~meshlib.config.yamlsafe.read_documents` gives it)
    → a validated :class:`HTTPRoute`, or ConfigError listing every problem found."""
    value = document.value
    if not isinstance(value, YMap):
        raise ConfigError(
            [Problem(file, document.line, document.index, "", "an HTTPRoute must be a mapping")]
        )
    findings = document_findings(value, _SCHEMA, document.line)
    name = as_str(at(value, "metadata.name")[0]) or ""
    namespace = as_str(at(value, "metadata.namespace")[0]) or DEFAULT_NAMESPACE
    ctx = DocContext(
        file, document.index, document.line, value, "HTTPRoute", GATEWAY_API, name, namespace
    )
    ctx.problems.extend(Problem(file, f.line, document.index, f.field, f.message) for f in findings)
    route = build_http_route(ctx)
    if ctx.problems or route is None:
        problems = sorted(ctx.problems, key=lambda p: p.line)
        raise ConfigError(problems or [Problem(file, ctx.line, ctx.index, "", "invalid route")])
    return route


def build_http_route(ctx: DocContext) -> HTTPRoute | None:
    """The loader-style builder: values the structural check rejected are skipped here (they
    were reported once); everything else wrong is reported through ``ctx``."""
    spec, _ = at(ctx.doc, "spec")
    if not isinstance(spec, YMap):
        return None
    problems_before = len(ctx.problems)
    parents = _parents(ctx, spec)
    hostnames = _hostnames(ctx, spec)
    rules = _rules(ctx, spec)
    if len(ctx.problems) > problems_before:
        return None
    # A value the structural check refused (reported there) was skipped above, so a route built
    # from such a document would have fewer list items than its manifest, and the reference
    # checks pair the model's items with the manifest's by position: it builds no route.
    if not passes(ctx.doc, _SCHEMA):
        return None
    created = as_str(at(ctx.doc, "metadata.creationTimestamp")[0])
    return HTTPRoute(ctx.name, ctx.namespace, parents, hostnames, rules, ctx.origin, created)


def _full_regex(value: str) -> Pattern:
    """RE2, matching the whole value (as Envoy's safe_regex does); the user's pattern is
    compiled alone first so that an error quotes it, not the anchored wrapper."""
    compile_regex(value)
    return compile_regex(f"(?:{value})$", anchored=True)


def _parents(ctx: DocContext, spec: YMap) -> tuple[ParentRef, ...]:
    out: list[ParentRef] = []
    items = limited_maps(ctx, spec, "parentRefs", "spec.parentRefs", MAX_PARENT_REFS)
    for i, item in items:
        path = f"spec.parentRefs[{i}]"
        name = as_str(item.get("name"))
        group = item.get("group", GATEWAY_GROUP)
        kind = item.get("kind", "Gateway")
        if name is None or not isinstance(group, str) or not isinstance(kind, str):
            continue
        if (group, kind) not in ((GATEWAY_GROUP, "Gateway"), ("", "Service"), ("core", "Service")):
            ctx.error(
                f"{path}.kind",
                item.line_of("kind"),
                f"parent {shown(group)}/{shown(kind)} is not supported: use kind Gateway "
                f"(group {GATEWAY_GROUP}) for ingress or kind Service (group '') for the mesh",
            )
            continue
        section = as_str(item.get("sectionName"))
        out.append(
            ParentRef(
                name,
                as_str(item.get("namespace")) or ctx.namespace,
                group,
                kind,
                section,
                as_int(item.get("port")),
            )
        )
    return tuple(out)


def _hostnames(ctx: DocContext, spec: YMap) -> tuple[str, ...]:
    raw = limited(ctx, spec, "hostnames", "spec.hostnames", MAX_HOSTNAMES)
    if not isinstance(raw, YSeq):
        return ()
    out: list[str] = []
    for i, host in enumerate(raw):
        if not isinstance(host, str):
            continue
        path, line = f"spec.hostnames[{i}]", raw.line_of(i)
        problem = _hostname_problem(host, wildcard=True)
        if problem is not None:
            ctx.error(path, line, problem)
        elif host in out:
            ctx.error(path, line, f"hostname {shown(host)} is listed twice")
        else:
            out.append(host)
    return tuple(out)


def _hostname_problem(host: str, *, wildcard: bool) -> str | None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return f"{shown(host)} is an IP address; a hostname must be a DNS name"
    if len(host) > 253 or not _HOSTNAME.match(host) or (host.startswith("*") and not wildcard):
        kind = "a lower-case DNS name, optionally prefixed by '*.'" if wildcard else "a DNS name"
        return f"{shown(host)} is not a valid hostname ({kind})"
    return None


def _rules(ctx: DocContext, spec: YMap) -> tuple[HTTPRouteRule, ...]:
    if "rules" not in spec:
        # The spec's default: one rule matching every path, with no backends.
        return (HTTPRouteRule(),)
    out: list[HTTPRouteRule] = []
    names: dict[str, int] = {}
    total = 0
    for i, item in limited_maps(ctx, spec, "rules", "spec.rules", MAX_RULES):
        path = f"spec.rules[{i}]"
        name = as_str(item.get("name"))
        if name is not None:
            if name in names:
                ctx.error(
                    f"{path}.name",
                    item.line_of("name"),
                    f"rule name {shown(name)} is used twice (also spec.rules[{names[name]}])",
                )
            names.setdefault(name, i)
        matches = _matches(ctx, item, path)
        total += len(matches)
        filters = _filters(ctx, item, path)
        _check_prefix_rewrite(ctx, item, path, matches, filters)
        backends: list[BackendRef] = []
        for j, b in limited_maps(ctx, item, "backendRefs", f"{path}.backendRefs", MAX_BACKEND_REFS):
            backend = _backend(ctx, b, f"{path}.backendRefs[{j}]", weighted=True)
            if backend is not None:
                backends.append(backend)
        out.append(
            HTTPRouteRule(matches, filters, tuple(backends), _timeouts(ctx, item, path), name)
        )
    if total > MAX_TOTAL_MATCHES:
        ctx.error(
            "spec.rules",
            spec.line_of("rules"),
            f"the rules hold {total} matches in all, at most {MAX_TOTAL_MATCHES} are allowed",
        )
    return tuple(out)


def _matches(ctx: DocContext, rule: YMap, path: str) -> tuple[RouteMatch, ...]:
    raw = rule.get("matches")
    if raw is None or (isinstance(raw, YSeq) and not raw):
        # The spec's default: PathPrefix "/". An empty list too, as implementations read it
        # (Go cannot tell it from a missing one): a rule matching nothing would be dead.
        return (RouteMatch(),)
    out: list[RouteMatch] = []
    for i, item in limited_maps(ctx, rule, "matches", f"{path}.matches", MAX_MATCHES):
        mpath = f"{path}.matches[{i}]"
        method = item.get("method")
        out.append(
            RouteMatch(
                _path_match(ctx, item, mpath),
                _value_matches(ctx, item, "headers", mpath, MAX_HEADER_MATCHES, fold=True),
                _value_matches(ctx, item, "queryParams", mpath, MAX_QUERY_MATCHES, fold=False),
                method if isinstance(method, str) else None,
            )
        )
    return tuple(out)


def _path_match(ctx: DocContext, match: YMap, mpath: str) -> PathMatch:
    raw = match.get("path")
    if not isinstance(raw, YMap):
        return PathMatch()
    type_ = raw.get("type", PathMatchType.PATH_PREFIX.value)
    value = raw.get("value", "/")
    if not isinstance(type_, str) or type_ not in _PATH_TYPES or not isinstance(value, str):
        return PathMatch()  # reported by the structural check
    kind = PathMatchType(type_)
    line = raw.line_of("value")
    where = f"{mpath}.path.value"
    if kind is PathMatchType.REGULAR_EXPRESSION:
        try:
            return PathMatch(kind, value, _full_regex(value))
        except ValueError as exc:
            ctx.error(where, line, str(exc))
            return PathMatch()
    problem = path_problem(value)
    if problem is not None:
        ctx.error(where, line, f"a {kind.value} path {problem}")
    return PathMatch(kind, value)


def path_problem(value: str) -> str | None:
    """Why ``value`` cannot be an Exact or PathPrefix path (the upstream CEL rules), or None."""
    if not value.startswith("/"):
        return f"must start with '/', got {shown(value)}"
    for bad in _PATH_FORBIDDEN:
        if bad in value:
            return f"must not contain {bad!r}, got {shown(value)}"
    if value.endswith(("/..", "/.")):
        return f"must not end with '/.' or '/..', got {shown(value)}"
    return None


def _value_matches(
    ctx: DocContext, match: YMap, key: str, mpath: str, limit: int, *, fold: bool
) -> tuple[ValueMatch, ...]:
    out: list[ValueMatch] = []
    seen: dict[str, int] = {}
    what = "header" if fold else "query parameter"
    for i, item in limited_maps(ctx, match, key, f"{mpath}.{key}", limit):
        path = f"{mpath}.{key}[{i}]"
        name, value = as_str(item.get("name")), item.get("value")
        type_ = item.get("type", ValueMatchType.EXACT.value)
        if name is None or not isinstance(value, str):
            continue
        if not isinstance(type_, str) or type_ not in _VALUE_TYPES:
            continue
        # Header names are case-insensitive (RFC 9110); query parameter names are not.
        norm = name.lower() if fold else name
        if norm in seen:
            ctx.error(
                f"{path}.name",
                item.line_of("name"),
                f"{what} {shown(name)} is matched twice in one match (also {mpath}.{key}"
                f"[{seen[norm]}]); the spec would ignore this one",
            )
            continue
        seen[norm] = i
        kind = ValueMatchType(type_)
        regex: Pattern | None = None
        if kind is ValueMatchType.REGULAR_EXPRESSION:
            try:
                regex = _full_regex(value)
            except ValueError as exc:
                ctx.error(f"{path}.value", item.line_of("value"), str(exc))
                continue
        out.append(ValueMatch(norm, value, kind, regex))
    return tuple(out)


_FILTER_FIELDS = {
    FilterType.REQUEST_HEADER_MODIFIER: "requestHeaderModifier",
    FilterType.RESPONSE_HEADER_MODIFIER: "responseHeaderModifier",
    FilterType.REQUEST_MIRROR: "requestMirror",
    FilterType.REQUEST_REDIRECT: "requestRedirect",
    FilterType.URL_REWRITE: "urlRewrite",
}


def _filters(ctx: DocContext, owner: YMap, path: str) -> tuple[HTTPRouteFilter, ...]:
    out: list[HTTPRouteFilter] = []
    first: dict[FilterType, int] = {}
    for i, item in limited_maps(ctx, owner, "filters", f"{path}.filters", MAX_FILTERS):
        fpath = f"{path}.filters[{i}]"
        raw_type = item.get("type")
        if not isinstance(raw_type, str) or raw_type not in _FILTER_TYPES:
            continue  # reported by the structural check
        kind = FilterType(raw_type)
        key = _FILTER_FIELDS[kind]
        others = [k for k in _FILTER_FIELDS.values() if k != key and k in item]
        if others:
            ctx.error(
                f"{fpath}.{others[0]}",
                item.line_of(others[0]),
                f"a {kind.value} filter takes only {key}, not {others[0]}",
            )
            continue
        config = item.get(key)
        if not isinstance(config, YMap):
            if key not in item:
                ctx.error(fpath, item.line, f"a {kind.value} filter needs {key}")
            continue
        # Every filter but RequestMirror may appear once per rule (upstream CEL rule).
        if kind is not FilterType.REQUEST_MIRROR and kind in first:
            ctx.error(
                f"{fpath}.type",
                item.line_of("type"),
                f"{kind.value} is given twice (also {path}.filters[{first[kind]}])",
            )
            continue
        first.setdefault(kind, i)
        built = _filter_config(ctx, kind, config, f"{fpath}.{key}")
        if built is not None:
            out.append(HTTPRouteFilter(kind, built))
    if FilterType.REQUEST_REDIRECT in first and FilterType.URL_REWRITE in first:
        ctx.error(
            f"{path}.filters",
            owner.line_of("filters"),
            "RequestRedirect and URLRewrite cannot be used together",
        )
    return tuple(out)


def _filter_config(
    ctx: DocContext, kind: FilterType, config: YMap, path: str
) -> FilterConfig | None:
    if kind in (FilterType.REQUEST_HEADER_MODIFIER, FilterType.RESPONSE_HEADER_MODIFIER):
        return _header_modifier(ctx, config, path)
    if kind is FilterType.REQUEST_MIRROR:
        return _mirror(ctx, config, path)
    hostname = as_str(config.get("hostname"))
    if hostname is not None:
        problem = _hostname_problem(hostname, wildcard=False)
        if problem is not None:
            ctx.error(f"{path}.hostname", config.line_of("hostname"), problem)
            return None
    modifier = _path_modifier(ctx, config, path)
    if kind is FilterType.URL_REWRITE:
        return URLRewrite(hostname, modifier)
    scheme, status = config.get("scheme"), config.get("statusCode", 302)
    # The schema checker checks enums of strings only: the status codes are checked here.
    if as_int(status) is not None and status not in REDIRECT_STATUS_CODES:
        codes = ", ".join(map(str, REDIRECT_STATUS_CODES))
        ctx.error(
            f"{path}.statusCode",
            config.line_of("statusCode"),
            f"{status} is not one of {codes}",
        )
        return None
    return RequestRedirect(
        scheme if isinstance(scheme, str) else None,
        hostname,
        modifier,
        as_int(config.get("port")),
        status if isinstance(status, int) else 302,
    )


def _header_modifier(ctx: DocContext, config: YMap, path: str) -> HeaderModifier:
    lists: dict[str, tuple[tuple[str, str], ...]] = {}
    for key in ("set", "add"):
        seen: set[str] = set()
        pairs: list[tuple[str, str]] = []
        for i, item in limited_maps(ctx, config, key, f"{path}.{key}", MAX_HEADER_MODIFICATIONS):
            name, value = as_str(item.get("name")), item.get("value")
            if name is None or not isinstance(value, str):
                continue
            if name.lower() in seen:
                ctx.error(
                    f"{path}.{key}[{i}].name",
                    item.line_of("name"),
                    f"header {shown(name)} is listed twice in {key}",
                )
                continue
            seen.add(name.lower())
            pairs.append((name.lower(), value))
        lists[key] = tuple(pairs)
    removed: list[str] = []
    raw = limited(ctx, config, "remove", f"{path}.remove", MAX_HEADER_MODIFICATIONS)
    if isinstance(raw, YSeq):
        for i, name in enumerate(raw):
            if isinstance(name, str) and name.lower() in removed:
                ctx.error(
                    f"{path}.remove[{i}]", raw.line_of(i), f"header {shown(name)} is listed twice"
                )
            elif isinstance(name, str):
                removed.append(name.lower())
    return HeaderModifier(lists["set"], lists["add"], tuple(removed))


def _mirror(ctx: DocContext, config: YMap, path: str) -> RequestMirror | None:
    raw = config.get("backendRef")
    if not isinstance(raw, YMap):
        return None
    backend = _backend(ctx, raw, f"{path}.backendRef", weighted=False)
    percent = 100.0
    if "percent" in config and "fraction" in config:
        ctx.error(
            f"{path}.fraction", config.line_of("fraction"), "give percent or fraction, not both"
        )
        return None
    if isinstance(config.get("percent"), int):
        percent = float(config["percent"])
    fraction = config.get("fraction")
    if isinstance(fraction, YMap):
        num, den = as_int(fraction.get("numerator")), as_int(fraction.get("denominator", 100))
        if num is None or den is None:
            return None
        if num > den:
            ctx.error(
                f"{path}.fraction.numerator",
                fraction.line_of("numerator"),
                f"numerator {num} is larger than the denominator {den}",
            )
            return None
        percent = 100.0 * num / den
    return RequestMirror(backend, percent) if backend is not None else None


def _path_modifier(ctx: DocContext, config: YMap, path: str) -> PathModifier | None:
    raw = config.get("path")
    if not isinstance(raw, YMap):
        return None
    type_ = raw.get("type")
    if not isinstance(type_, str) or type_ not in _MODIFIER_TYPES:
        return None
    kind = PathModifierType(type_)
    key = "replaceFullPath" if kind is PathModifierType.REPLACE_FULL_PATH else "replacePrefixMatch"
    other = "replacePrefixMatch" if key == "replaceFullPath" else "replaceFullPath"
    if other in raw:
        ctx.error(f"{path}.path.{other}", raw.line_of(other), f"type {kind.value} takes {key}")
        return None
    value = raw.get(key)
    if not isinstance(value, str):
        if key not in raw:
            ctx.error(f"{path}.path", raw.line, f"type {kind.value} needs {key}")
        return None
    if not value.startswith("/"):
        ctx.error(
            f"{path}.path.{key}", raw.line_of(key), f"must start with '/', got {shown(value)}"
        )
        return None
    return PathModifier(kind, value)


def _check_prefix_rewrite(
    ctx: DocContext,
    rule: YMap,
    path: str,
    matches: tuple[RouteMatch, ...],
    filters: tuple[HTTPRouteFilter, ...],
) -> None:
    """ReplacePrefixMatch replaces the matched prefix: the rule must have exactly one match, of
    type PathPrefix (upstream CEL rule), or there is no prefix to replace."""
    for f in filters:
        config = f.config
        if not isinstance(config, (RequestRedirect, URLRewrite)) or config.path is None:
            continue
        if config.path.type is not PathModifierType.REPLACE_PREFIX_MATCH:
            continue
        if len(matches) != 1 or matches[0].path.type is not PathMatchType.PATH_PREFIX:
            ctx.error(
                f"{path}.filters",
                rule.line_of("filters"),
                f"{f.type.value} with ReplacePrefixMatch needs exactly one match, of path type "
                "PathPrefix, in its rule",
            )


def _backend(ctx: DocContext, item: YMap, path: str, *, weighted: bool) -> BackendRef | None:
    name = as_str(item.get("name"))
    group, kind = item.get("group", ""), item.get("kind", "Service")
    if name is None or not isinstance(group, str) or not isinstance(kind, str):
        return None
    port = as_int(item.get("port"))
    # Upstream CEL rule: a Service backend names its port. A backend of another kind is kept,
    # not refused: the spec gives its share of the traffic a 500 (BackendRef.resolvable).
    if group in ("", "core") and kind == "Service" and "port" not in item:
        ctx.error(f"{path}.port", item.line, "a Service backend needs port")
        return None
    weight = as_int(item.get("weight", 1)) if weighted else 1
    if weight is None:
        return None
    filters = _filters(ctx, item, path) if weighted else ()
    namespace = as_str(item.get("namespace")) or ctx.namespace
    return BackendRef(
        name, namespace, port, weight, "" if group == "core" else group, kind, filters
    )


def _timeouts(ctx: DocContext, rule: YMap, path: str) -> RouteTimeouts:
    raw = rule.get("timeouts")
    if not isinstance(raw, YMap):
        return RouteTimeouts()
    request = _gateway_duration(raw.get("request"))
    backend = _gateway_duration(raw.get("backendRequest"))
    if request and backend is not None and backend > request:
        ctx.error(
            f"{path}.timeouts.backendRequest",
            raw.line_of("backendRequest"),
            f"backendRequest {shown(raw['backendRequest'])} is longer than request "
            f"{shown(raw['request'])}",
        )
    return RouteTimeouts(request, backend)


def _gateway_duration(value: object) -> float | None:
    """A GEP-2257 duration in seconds; None when absent or malformed (the schema reports it)."""
    if not isinstance(value, str) or not _GATEWAY_DURATION.match(value):
        return None
    millis = sum(int(n) * round(_UNIT_SECONDS[u] * 1000) for n, u in _DURATION_PART.findall(value))
    return millis / 1000


def parse_gateway_duration(text: str) -> float:
    """``"10s"``, ``"500ms"``, ``"1h"``, ``"1m30s"`` → seconds; ValueError for anything else
    (fractions, negative values, bare numbers, more than 4 parts or 5 digits per part)."""
    seconds = _gateway_duration(text)
    if seconds is None:
        raise ValueError(
            f"invalid Gateway API duration {shown(text)}: use up to 4 parts of up to 5 digits "
            "with a unit h, m, s or ms, such as '10s', '500ms', '1h', '1m30s'"
        )
    return seconds
