"""Builders for the meshlib/v1 kinds: Mesh, Service, TrafficPolicy, FaultInjection and
TrafficMirror (RequestAuthentication is kept raw for the inbound side).
"""

from __future__ import annotations

import math
from sys import intern
from typing import Any

from meshlib.config.documents import DocContext, as_int, as_number, as_str, at, maps
from meshlib.config.model import (
    NO_LABELS,
    AbortFault,
    AccessControl,
    DelayFault,
    Egress,
    Endpoint,
    FaultRule,
    LoadBalancerKind,
    MeshSettings,
    MirrorRule,
    MTLSMode,
    PolicyTarget,
    RateLimitPolicy,
    ServiceDef,
    TrafficPolicyDoc,
)
from meshlib.config.schema import POLICY_FIELDS, RETRY_ON, PolicyField
from meshlib.config.values import (
    MAX_DURATION,
    MIN_DURATION,
    check_duration_range,
    parse_address,
    parse_duration,
    shown,
)
from meshlib.config.yamlsafe import YMap

#: gRPC A6: at most 5 tries per call whatever the configuration says, so 4 retries.
MAX_RETRIES = 4


def build_mesh(ctx: DocContext) -> MeshSettings:
    spec = ctx.doc.get("spec")
    if not isinstance(spec, YMap):
        return MeshSettings()
    defaults = MeshSettings()
    trust = as_str(spec.get("trustDomain")) or defaults.trust_domain
    try:
        mtls = MTLSMode(spec.get("mtls", defaults.mtls.value))
        access = AccessControl(spec.get("accessControl", defaults.access_control.value))
        egress = Egress(spec.get("egress", defaults.egress.value))
    except ValueError:  # reported by the structural check
        return defaults
    log = spec.get("accessLog")
    access_log = None
    if isinstance(log, YMap) and log.get("enabled", True) is True:
        access_log = str(log.get("format", "json"))
    tracing = spec.get("tracing")
    sampling = as_number(tracing.get("sampling")) if isinstance(tracing, YMap) else None
    if sampling is None or not 0.0 <= sampling <= 1.0:  # out of range: reported by the check
        sampling = defaults.tracing_sampling
    return MeshSettings(trust, mtls, access, egress, access_log, sampling)


def build_service(ctx: DocContext) -> ServiceDef | None:
    if "." in ctx.name:
        name_line = at(ctx.doc, "metadata.name")[1]
        ctx.error(
            "metadata.name",
            name_line,
            f"service name {shown(ctx.name)} may not contain '.': services are addressed as "
            "name.namespace",
        )
        return None
    spec = ctx.doc.get("spec")
    if spec is None:
        return ServiceDef(ctx.name, intern(ctx.namespace), (), origin=ctx.origin)
    if not isinstance(spec, YMap):
        return None
    endpoints: list[Endpoint] = []
    seen: dict[str, int] = {}
    for i, item, _ in maps(spec.get("endpoints")):
        address = as_str(item.get("address"))
        if address is None:
            continue
        path = f"spec.endpoints[{i}]"
        try:
            parse_address(address)
        except ValueError as exc:
            ctx.error(f"{path}.address", item.line_of("address"), str(exc))
            continue
        if address in seen:
            ctx.error(
                f"{path}.address",
                item.line_of("address"),
                f"endpoint {address} is listed twice (also spec.endpoints[{seen[address]}])",
            )
            continue
        seen[address] = i
        weight = as_int(item.get("weight", 1))
        labels = item.get("labels")  # not a map of strings: reported by the structural check
        # Label keys and values repeat across endpoints (zones, versions): one string each.
        clean = (
            {intern(k): intern(v) for k, v in labels.items() if isinstance(v, str)}
            if isinstance(labels, YMap) and labels
            else NO_LABELS
        )
        endpoints.append(Endpoint(address, weight if weight and weight > 0 else 1, clean))
    account = as_str(spec.get("serviceAccount"))
    port = as_int(spec.get("port"))
    return ServiceDef(ctx.name, intern(ctx.namespace), tuple(endpoints), account, port, ctx.origin)


def build_target(ctx: DocContext, *, service_required: bool = False) -> PolicyTarget | None:
    target, line = at(ctx.doc, "spec.target")
    if target is None:
        if service_required:
            ctx.error("spec.target", line, "a target with a service is required")
            return None
        return PolicyTarget()
    if not isinstance(target, YMap):
        return None
    ns = as_str(target.get("namespace"))
    service = as_str(target.get("service"))
    route = as_str(target.get("route"))
    if service is None:
        if route is not None:
            ctx.error(
                "spec.target.route", target.line_of("route"), "a route target needs a service"
            )
            return None
        if service_required:
            ctx.error("spec.target.service", target.line, "a target service is required here")
            return None
        return PolicyTarget(namespace=ns)
    key = ctx.service(service, "spec.target.service", target.line_of("service"), ns)
    if key is None:
        return None
    return PolicyTarget(namespace=key.split(".", 1)[1], service=key, route=route)


def build_traffic_policy(ctx: DocContext) -> TrafficPolicyDoc | None:
    spec = ctx.doc.get("spec")
    if not isinstance(spec, YMap):
        return None
    target = build_target(ctx)
    fields: dict[str, Any] = {}
    for pf in POLICY_FIELDS:
        value, line = at(spec, pf.yaml_path)
        if value is None:
            continue
        converted = _convert(ctx, pf, value, f"spec.{pf.yaml_path}", line)
        if converted is not None:
            fields[pf.model_name] = converted
    # rateLimit is one object in the model: requests per second and burst belong together.
    rps = as_number(at(spec, "rateLimit.requestsPerSecond")[0])
    fields.pop("rate_limit", None)
    if rps is not None and rps > 0:
        burst = as_int(at(spec, "rateLimit.burst")[0])
        fields["rate_limit"] = RateLimitPolicy(rps, burst if burst else max(1, math.ceil(rps)))
    _check_orderings(ctx, spec, fields)
    if "mtls" in fields and target is not None and target.scope in ("mesh", "route"):
        ctx.error(
            "spec.mtls.mode",
            at(spec, "mtls.mode")[1],
            "mtls applies to a namespace or a service (mesh-wide it is Mesh.spec.mtls; "
            "a route cannot have its own: TLS belongs to the connection)",
        )
        return None
    if target is None:
        return None
    return TrafficPolicyDoc(ctx.name, ctx.namespace, target, fields, ctx.origin)


def _convert(ctx: DocContext, pf: PolicyField, value: Any, path: str, line: int) -> Any:
    """One policy leaf, converted to its model value; None if invalid (and then reported)."""
    if pf.convert in ("duration", "hedge_delay"):
        if pf.convert == "hedge_delay" and value == "p95":
            return "p95"  # stands for None in the model; see below
        if not isinstance(value, str):
            return None
        try:
            seconds = parse_duration(value)
        except ValueError:
            return None  # the structural check reported the syntax
        lo, hi = pf.bounds or (MIN_DURATION, MAX_DURATION)
        try:
            check_duration_range(seconds, minimum=lo, maximum=hi)
        except ValueError as exc:
            ctx.error(path, line, f"{shown(value)}: {exc}")
            return None
        return seconds
    if pf.convert == "retry_on":
        return _retry_on(ctx, value, path, line)
    if pf.convert == "lb_kind":
        try:
            return LoadBalancerKind(value)
        except ValueError:
            return None
    if pf.convert == "mtls_mode":
        try:
            return MTLSMode(value)
        except ValueError:
            return None  # the structural check reported the value
    schema_type = pf.schema.get("type")
    if schema_type == "integer":
        number = as_int(value)
        if number is None or number < pf.schema.get("minimum", -math.inf):
            return None
        if number > pf.schema.get("maximum", math.inf):
            return None
        if pf.model_name == "retries.attempts" and number > MAX_RETRIES:
            ctx.warn(
                path,
                line,
                f"attempts {number} clamped to {MAX_RETRIES} retries (at most 5 tries per call)",
            )
            return MAX_RETRIES
        return number
    if schema_type == "number":
        num = as_number(value)
        if num is None or not math.isfinite(num):
            return None
        return num  # bounds were reported by the structural check; nothing is returned then
    if schema_type == "boolean":
        return value if isinstance(value, bool) else None
    return value  # pragma: no cover - every table entry has a type


def _retry_on(ctx: DocContext, value: Any, path: str, line: int) -> frozenset[str] | None:
    if isinstance(value, str):
        items = [v.strip().lower() for v in value.split(",") if v.strip()]
    elif isinstance(value, list):
        items = [v.strip().lower() for v in value if isinstance(v, str)]
    else:
        return None
    bad = [v for v in items if v not in RETRY_ON and not (v.isdigit() and 100 <= int(v) <= 599)]
    for v in bad:
        ctx.error(
            path,
            line,
            f"unknown retry condition {shown(v)}; "
            f"use {', '.join(RETRY_ON)} or a status code like 503",
        )
    return None if bad else frozenset(items)


def _check_orderings(ctx: DocContext, spec: YMap, fields: dict[str, Any]) -> None:
    for lower, upper, what in (
        ("retries.per_try_timeout", "timeout", "perTryTimeout must be shorter than timeout"),
        ("retries.backoff.base", "retries.backoff.cap", "baseInterval must not exceed maxInterval"),
        (
            "outlier_detection.base_ejection_time",
            "outlier_detection.max_ejection_time",
            "baseEjectionTime must not exceed maxEjectionTime",
        ),
    ):
        lo, hi = fields.get(lower), fields.get(upper)
        if not isinstance(lo, float) or not isinstance(hi, float):
            continue
        too_big = lo >= hi if lower == "retries.per_try_timeout" else lo > hi
        if too_big:
            yaml_path = next(pf.yaml_path for pf in POLICY_FIELDS if pf.model_name == lower)
            ctx.error(f"spec.{yaml_path}", at(spec, yaml_path)[1], what)
    if fields.get("hedging.delay") == "p95":
        fields["hedging.delay"] = None


def build_fault(ctx: DocContext) -> FaultRule | None:
    spec = ctx.doc.get("spec")
    if not isinstance(spec, YMap):
        return None
    target = build_target(ctx, service_required=True)
    delay: DelayFault | None = None
    abort: AbortFault | None = None
    raw_delay, raw_abort = spec.get("delay"), spec.get("abort")
    if isinstance(raw_delay, YMap) and isinstance(raw_delay.get("fixed"), str):
        try:
            fixed = parse_duration(raw_delay["fixed"])
        except ValueError:
            fixed = None  # the structural check reported the syntax
        try:
            if fixed is not None:
                check_duration_range(fixed)
                delay = DelayFault(fixed, _percent(raw_delay.get("percent")))
        except ValueError as exc:
            ctx.error(
                "spec.delay.fixed",
                raw_delay.line_of("fixed"),
                f"{shown(raw_delay['fixed'])}: {exc}",
            )
    status = as_int(raw_abort.get("status")) if isinstance(raw_abort, YMap) else None
    if isinstance(raw_abort, YMap) and status is not None and 200 <= status <= 599:
        abort = AbortFault(status, _percent(raw_abort.get("percent")))
    if raw_delay is None and raw_abort is None:
        ctx.error("spec", spec.line, "a FaultInjection needs a delay, an abort or both")
    match, _ = at(spec, "match.headers")
    headers = (
        {k.lower(): v for k, v in match.items() if isinstance(v, str)}
        if isinstance(match, YMap)
        else {}
    )
    if target is None or (delay is None and abort is None):
        return None
    return FaultRule(ctx.name, ctx.namespace, target, delay, abort, headers, ctx.origin)


def _percent(value: Any) -> float:
    number = as_number(value)
    return 100.0 if number is None or not 0 <= number <= 100 else number


def build_mirror(ctx: DocContext) -> MirrorRule | None:
    spec = ctx.doc.get("spec")
    if not isinstance(spec, YMap):
        return None
    service = ctx.service(spec.get("service"), "spec.service", spec.line_of("service"))
    mirror = ctx.service(spec.get("mirror"), "spec.mirror", spec.line_of("mirror"))
    if service is None or mirror is None:
        return None
    if service == mirror:
        ctx.error("spec.mirror", spec.line_of("mirror"), f"{mirror} cannot mirror to itself")
        return None
    return MirrorRule(
        ctx.name, ctx.namespace, service, mirror, _percent(spec.get("percent")), ctx.origin
    )
