"""The meshlib/v1 ``RequestAuthentication`` kind: its JSON Schema fragment and its builder.

Istio semantics, without workload selectors: ``spec.target.service`` names one service of the
document's namespace; no target means every service of the namespace. Each ``jwtRules`` entry
names an ``issuer`` and exactly one JWKS source (``jwksUri``, inline ``jwks`` or ``jwksFile``).

Only asymmetric algorithms are accepted (RS*, PS*, ES*): ``none`` and the HMAC family are
rejected with a clear message — a shared secret is not an origin-authentication mechanism
(whoever can verify can also mint), and a key set that mixes HMAC with public keys is what
algorithm-confusion attacks exploit. Istio, too, verifies only against JWKS public keys.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from meshlib.config.authnmodel import JwtLocation, JwtRule, RequestAuthentication
from meshlib.config.documents import DocContext, as_str, maps
from meshlib.config.fragments import DURATION, NONEMPTY, STRING, Schema, array, obj
from meshlib.config.values import MAX_JSON_DEPTH, format_duration, parse_duration, parse_json, shown
from meshlib.config.yamlsafe import YMap, YSeq

#: The JWS algorithms a rule may allow, by the key type that verifies them.
ALGORITHMS: dict[str, str] = {
    **{f"RS{n}": "RSA" for n in (256, 384, 512)},
    **{f"PS{n}": "RSA" for n in (256, 384, 512)},
    **{f"ES{n}": "EC" for n in (256, 384, 512)},
}
DEFAULT_ALGORITHMS = ("RS256", "ES256")
DEFAULT_CLOCK_SKEW = 60.0
MAX_CLOCK_SKEW = 300.0
_SOURCES = ("jwksUri", "jwks", "jwksFile")


def request_authentication_spec() -> Schema:
    """``spec`` of a RequestAuthentication document."""
    location = obj({"name": NONEMPTY, "prefix": STRING}, "name")
    rule = obj(
        {
            "issuer": NONEMPTY,
            "audiences": array(NONEMPTY, 1),
            "jwksUri": {**NONEMPTY, "description": "http(s) URL of the issuer's JWKS"},
            "jwks": {**NONEMPTY, "description": "the JWKS itself, as a JSON string"},
            "jwksFile": {**NONEMPTY, "description": "path of a JWKS file (re-read on change)"},
            "fromHeaders": array(location, 1),
            "algorithms": array(NONEMPTY, 1),
            "clockSkew": DURATION,
        },
        "issuer",
    )
    return obj(
        {
            "target": obj(
                {"service": NONEMPTY},
                "service",
                description="absent: every service of the document's namespace",
            ),
            "jwtRules": array(rule, 1),
        },
        "jwtRules",
    )


def build_request_authentication(ctx: DocContext) -> RequestAuthentication | None:
    spec = ctx.doc.get("spec")
    if not isinstance(spec, YMap):
        return None
    ok_target, service = ctx.local_target(spec, "RequestAuthentication")
    if not ok_target:
        return None
    rules: list[JwtRule] = []
    issuers: dict[str, int] = {}
    ok = True
    for i, item, item_line in maps(spec.get("jwtRules")):
        rule = _rule(ctx, item, f"spec.jwtRules[{i}]")
        if rule is None:
            ok = False
            continue
        if rule.issuer in issuers:
            ctx.error(
                f"spec.jwtRules[{i}].issuer",
                item_line,
                f"issuer {shown(rule.issuer)} already has a rule "
                f"(spec.jwtRules[{issuers[rule.issuer]}])",
            )
            ok = False
            continue
        issuers[rule.issuer] = i
        rules.append(rule)
    if not ok or not rules:
        return None
    return RequestAuthentication(ctx.name, ctx.namespace, service, tuple(rules), ctx.origin)


def _rule(ctx: DocContext, item: YMap, path: str) -> JwtRule | None:
    issuer = as_str(item.get("issuer"))
    if issuer is None:
        return None  # reported by the structural check
    ok = True
    present = [s for s in _SOURCES if s in item]
    if len(present) != 1:
        ctx.error(
            path,
            item.line,
            "give exactly one JWKS source: jwksUri, jwks or jwksFile"
            + (f" (found {', '.join(present)})" if present else ""),
        )
        ok = False
    uri = as_str(item.get("jwksUri"))
    if uri is not None:
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            ctx.error(
                f"{path}.jwksUri", item.line_of("jwksUri"), f"{shown(uri)} is not an http(s) URL"
            )
            ok = False
    inline = as_str(item.get("jwks"))
    if inline is not None and not _valid_jwks(inline):
        ctx.error(
            f"{path}.jwks",
            item.line_of("jwks"),
            'jwks must be a JSON object {"keys": [...]} (a JWK Set), '
            f"nested at most {MAX_JSON_DEPTH} levels",
        )
        ok = False
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    raw_algs = item.get("algorithms")
    if isinstance(raw_algs, YSeq):
        chosen: list[str] = []
        for j, alg in enumerate(raw_algs):
            if not isinstance(alg, str):
                continue
            problem = _algorithm_problem(alg)
            if problem:
                ctx.error(f"{path}.algorithms[{j}]", raw_algs.line_of(j), problem)
                ok = False
            elif alg not in chosen:
                chosen.append(alg)
        algorithms = tuple(chosen)
    skew = DEFAULT_CLOCK_SKEW
    raw_skew = as_str(item.get("clockSkew"))
    if raw_skew is not None:
        try:
            skew = parse_duration(raw_skew)
        except ValueError:
            return None  # reported by the structural check (duration pattern)
        if skew > MAX_CLOCK_SKEW:
            ctx.error(
                f"{path}.clockSkew",
                item.line_of("clockSkew"),
                f"clockSkew {raw_skew} is above the {format_duration(MAX_CLOCK_SKEW)} limit",
            )
            ok = False
    locations: list[JwtLocation] = []
    for _, loc, _ in maps(item.get("fromHeaders")):
        name = as_str(loc.get("name"))
        prefix = loc.get("prefix", "")
        if name is not None and isinstance(prefix, str):
            locations.append(JwtLocation(name.lower(), prefix))
    raw_aud = item.get("audiences")
    audiences = tuple(a for a in raw_aud if isinstance(a, str)) if isinstance(raw_aud, YSeq) else ()
    if not ok:
        return None
    return JwtRule(
        issuer=issuer,
        audiences=audiences,
        jwks_uri=uri,
        jwks=inline,
        jwks_file=as_str(item.get("jwksFile")),
        from_headers=tuple(locations) or (JwtLocation(),),
        algorithms=algorithms,
        clock_skew=skew,
    )


def _algorithm_problem(alg: str) -> str | None:
    if alg in ALGORITHMS:
        return None
    if alg.lower() == "none":
        return "algorithm 'none' (unsigned tokens) is never allowed"
    if alg.upper().startswith("HS"):
        return (
            f"{alg}: HMAC (shared-secret) algorithms are not supported for origin "
            "authentication; use an asymmetric algorithm (RS*, PS*, ES*) and a JWKS"
        )
    return f"unknown algorithm {shown(alg)}; use one of: {', '.join(ALGORITHMS)}"


def _valid_jwks(text: str) -> bool:
    try:
        data = parse_json(text)
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("keys"), list)
