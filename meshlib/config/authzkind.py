"""The meshlib/v1 ``AuthorizationPolicy`` kind: its JSON Schema fragment and its builder.

Istio semantics, without workload selectors: ``spec.target.service`` names one service of the
document's namespace; no target means every service of the namespace. ``action`` is ``ALLOW``
(default) or ``DENY``. Each rule has ``from`` (sources), ``to`` (operations) and ``when``
(JWT claim conditions); the Istio wrappers ``from: [{source: {...}}]`` and
``to: [{operation: {...}}]`` are accepted as well as the flat form.
"""

from __future__ import annotations

import re

from meshlib.config.authzmodel import (
    AuthorizationPolicy,
    AuthorizationPolicyRule,
    AuthzAction,
    AuthzCondition,
    AuthzOperation,
    AuthzSource,
)
from meshlib.config.documents import DocContext, as_str, maps
from meshlib.config.fragments import NONEMPTY, STRING, Schema, array, enum, obj
from meshlib.config.values import shown
from meshlib.config.yamlsafe import YMap, YSeq

_GLOBS: Schema = array(NONEMPTY, 1)
_SOURCE_FIELDS: dict[str, Schema] = {
    "principals": _GLOBS,
    "namespaces": _GLOBS,
    "requestPrincipals": _GLOBS,
}
_OPERATION_FIELDS: dict[str, Schema] = {"methods": _GLOBS, "paths": _GLOBS}
_CLAIM_KEY = re.compile(r"^request\.auth\.claims((?:\[[^\[\]]+\])+)$")


def authorization_policy_spec() -> Schema:
    """``spec`` of an AuthorizationPolicy document."""
    source = obj({**_SOURCE_FIELDS, "source": obj(dict(_SOURCE_FIELDS))})
    operation = obj({**_OPERATION_FIELDS, "operation": obj(dict(_OPERATION_FIELDS))})
    condition = obj(
        {
            "key": {
                "type": "string",
                "pattern": _CLAIM_KEY.pattern,
                "description": "request.auth.claims[name] (nested: [a][b])",
            },
            "values": array(STRING, 1),
        },
        "key",
        "values",
    )
    rule = obj({"from": array(source, 1), "to": array(operation, 1), "when": array(condition, 1)})
    return obj(
        {
            "target": obj(
                {"service": NONEMPTY},
                "service",
                description="absent: every service of the policy's namespace",
            ),
            "action": enum("ALLOW", "DENY", description="default ALLOW; DENY beats ALLOW"),
            "rules": array(rule),
        }
    )


def build_authorization_policy(ctx: DocContext) -> AuthorizationPolicy | None:
    spec = ctx.doc.get("spec")
    if spec is None:
        spec = YMap(ctx.line)
    if not isinstance(spec, YMap):
        return None
    ok_target, service = ctx.local_target(spec, "AuthorizationPolicy")
    if not ok_target:
        return None
    action = AuthzAction.DENY if spec.get("action") == "DENY" else AuthzAction.ALLOW
    rules: list[AuthorizationPolicyRule] = []
    ok = True
    for i, item, _ in maps(spec.get("rules")):
        rule = _rule(ctx, item, f"spec.rules[{i}]")
        if rule is None:
            ok = False
        else:
            rules.append(rule)
    if not ok:
        return None
    return AuthorizationPolicy(ctx.name, ctx.namespace, service, action, tuple(rules), ctx.origin)


def _rule(ctx: DocContext, item: YMap, path: str) -> AuthorizationPolicyRule | None:
    ok = True
    sources: list[AuthzSource] = []
    for i, entry, _ in maps(item.get("from")):
        body = _unwrap(entry, "source")
        where = f"{path}.from[{i}]" + (".source" if body is not entry else "")
        sources.append(
            AuthzSource(
                principals=_principals(_globs(ctx, body, "principals", where)),
                namespaces=_globs(ctx, body, "namespaces", where),
                request_principals=_globs(ctx, body, "requestPrincipals", where),
            )
        )
    operations: list[AuthzOperation] = []
    for i, entry, _ in maps(item.get("to")):
        body = _unwrap(entry, "operation")
        where = f"{path}.to[{i}]" + (".operation" if body is not entry else "")
        methods = _globs(ctx, body, "methods", where)
        for j, m in enumerate(methods or ()):
            if m != "*" and not m.isalpha():
                ctx.error(
                    f"{where}.methods[{j}]",
                    body.line_of("methods"),
                    f"{shown(m)} is not an HTTP method",
                )
                ok = False
        paths = _globs(ctx, body, "paths", where)
        for j, p in enumerate(paths or ()):
            if not (p.startswith("/") or p.startswith("*")):
                ctx.error(
                    f"{where}.paths[{j}]",
                    body.line_of("paths"),
                    f"path {shown(p)} must start with '/' (or '*' for a suffix match)",
                )
                ok = False
        operations.append(
            AuthzOperation(
                methods=None
                if methods is None or "*" in methods
                else frozenset(m.upper() for m in methods),
                paths=paths,
            )
        )
    conditions: list[AuthzCondition] = []
    for i, entry, line in maps(item.get("when")):
        key = as_str(entry.get("key"))
        values = entry.get("values")
        match = _CLAIM_KEY.match(key) if key else None
        if key is None or not isinstance(values, YSeq):
            continue  # reported by the structural check
        if match is None:
            ctx.error(
                f"{path}.when[{i}].key",
                line,
                f"unsupported condition key {shown(key)}; use request.auth.claims[<name>]",
            )
            ok = False
            continue
        claim = tuple(match.group(1)[1:-1].split("]["))
        conditions.append(
            AuthzCondition(key, claim, tuple(v for v in values if isinstance(v, str)))
        )
    if not ok:
        return None
    return AuthorizationPolicyRule(tuple(sources), tuple(operations), tuple(conditions))


def _unwrap(entry: YMap, wrapper: str) -> YMap:
    inner = entry.get(wrapper)
    return inner if isinstance(inner, YMap) else entry


def _globs(ctx: DocContext, body: YMap, field: str, where: str) -> tuple[str, ...] | None:
    """The glob list at ``body[field]`` (None when absent); a ``*`` inside a value is an error."""
    raw = body.get(field)
    if not isinstance(raw, YSeq):
        return None
    values: list[str] = []
    for j, v in enumerate(raw):
        if not isinstance(v, str) or not v:
            continue
        if "*" in v[1:-1] or (len(v) > 1 and v.startswith("*") and v.endswith("*")):
            ctx.error(
                f"{where}.{field}[{j}]",
                raw.line_of(j),
                f"{shown(v)}: '*' is allowed only alone, as a prefix or as a suffix",
            )
            continue
        values.append(v)
    return tuple(values)


def _principals(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Principals without the ``spiffe://`` scheme (Istio writes ``td/ns/x/sa/y``)."""
    if values is None:
        return None
    return tuple(v.removeprefix("spiffe://") for v in values)
