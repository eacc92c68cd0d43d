"""Authorization of inbound requests: SMI TrafficTarget and meshlib AuthorizationPolicy, pure.

Order of evaluation for one request to a destination service (Istio semantics, SMI defaults):

1. the path is normalised (:func:`normalize_path`); a path that cannot be normalised safely
   (NUL, backslash, ``..`` above the root) is denied outright;
2. a matching ``DENY`` AuthorizationPolicy denies — DENY always beats ALLOW;
3. the destination's *allow set* is every ``ALLOW`` AuthorizationPolicy that applies to it and
   every TrafficTarget naming its service account. When the set is not empty, the request must
   match one member, else it is denied;
4. with an empty allow set the mesh-wide ``accessControl`` decides: ``open`` allows,
   ``audit`` and ``enforce`` deny by default;
5. in ``audit`` mode nothing is refused: the verdict is ``allowed`` and ``denied_by_policy``
   records the would-be denial.

Identities are read only from the caller's verified SPIFFE ID. A TrafficTarget source is the
workload ID ``spiffe://<mesh trust domain>/ns/<namespace>/sa/<account>``; an ID of another
trust domain or another shape matches no source, so an unknown identity never widens access.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshlib.config.authzmodel import (
    AuthorizationPolicy,
    AuthorizationPolicyRule,
    AuthzAction,
    AuthzCondition,
    AuthzOperation,
    AuthzSource,
)
from meshlib.config.model import AccessControl, ServiceDef, Snapshot
from meshlib.config.smimodel import HTTPMatch, TrafficTarget
from meshlib.policy.routing import Router, match_http

if TYPE_CHECKING:  # meshlib.identity loads cryptography; authorization only reads the fields
    from meshlib.identity.spiffe import SpiffeID

__all__ = [
    "AuthzIndex",
    "AuthzVerdict",
    "authorize",
    "index_for",
    "normalize_path",
]


@dataclass(frozen=True, slots=True)
class AuthzVerdict:
    """One authorization decision.

    ``allowed``: whether the request may proceed (always true in ``audit`` mode).
    ``denied_by_policy``: whether the policy denies it (true for audit-mode would-denials).
    ``rule``: what decided, e.g. ``"TrafficTarget default/api rule 0"``,
    ``"AuthorizationPolicy default/deny-admin rule 1"`` or ``"default: open"``.
    ``mode``: the mesh's ``accessControl`` (``open``, ``audit``, ``enforce``).
    ``path``: the normalised path the decision used (``None`` if it could not be normalised).
    """

    allowed: bool
    rule: str
    mode: str
    denied_by_policy: bool = False
    path: str | None = None

    @property
    def verdict(self) -> str:
        """``"allow"`` or ``"deny"``: the policy's answer (the metric's ``verdict`` label)."""
        return "deny" if self.denied_by_policy else "allow"


# --- path normalisation ------------------------------------------------------------------------

_DECODE = {"%2f": "/", "%2e": ".", "%5c": "\\", "%00": "\x00"}


def normalize_path(path: str) -> str | None:
    """The path an authorization decision (and the app) must use, or ``None``: refuse it.

    Istio's ``DECODE_AND_MERGE_SLASHES`` plus RFC 3986 dot-segment removal:

    * ``%2F``, ``%2E``, ``%5C`` and ``%00`` (any case) are decoded first, so an encoded slash or dot
      cannot hide a segment (ASGI servers already decoded everything else once);
    * a NUL byte or a backslash (literal or ``%5C``) is refused: backends disagree on them;
    * ``//`` collapses to ``/``; ``/./`` disappears; ``/x/../`` goes up one segment;
      a ``..`` that would climb above the root is refused;
    * a trailing slash is kept (``/admin/`` is a different path from ``/admin``);
    * the query string is not part of ``scope["path"]`` and is never looked at;
    * case is kept: matching is case-sensitive, as in Istio.
    """
    if not path.startswith("/"):
        return None
    if not ("%" in path or "\\" in path or "\x00" in path or "//" in path or "/." in path):
        return path  # the common case: nothing to decode, merge, remove or refuse
    decoded = path
    if "%" in decoded:
        out: list[str] = []
        i = 0
        while i < len(decoded):
            chunk = decoded[i : i + 3].lower()
            if chunk in _DECODE:
                out.append(_DECODE[chunk])
                i += 3
            else:
                out.append(decoded[i])
                i += 1
        decoded = "".join(out)
    if "\x00" in decoded or "\\" in decoded:
        return None
    segments: list[str] = []
    parts = decoded.split("/")[1:]
    for part in parts:
        if part in ("", "."):
            continue
        if part == "..":
            if not segments:
                return None
            segments.pop()
            continue
        segments.append(part)
    trailing = len(parts) > 0 and parts[-1] in ("", ".", "..") and bool(segments)
    normal = "/" + "/".join(segments)
    if trailing:
        normal += "/"
    return normal


# --- the per-destination index -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TargetRule:
    """One TrafficTarget rule resolved against the snapshot: ``None`` matches any request."""

    label: str
    matches: tuple[HTTPMatch, ...] | None


@dataclass(frozen=True, slots=True)
class _Target:
    target: TrafficTarget
    sources: frozenset[tuple[str, str]]  # (service account, namespace)
    rules: tuple[_TargetRule, ...]


@dataclass(frozen=True, slots=True)
class AuthzIndex:
    """What authorization needs for one destination service, derived once per snapshot."""

    service: ServiceDef
    trust_domain: str
    mode: AccessControl
    targets: tuple[_Target, ...]
    deny: tuple[AuthorizationPolicy, ...]
    allow: tuple[AuthorizationPolicy, ...]
    #: Whether any authorization applies here (else everything is allowed untouched).
    in_force: bool = field(init=False)
    #: Whether any rule matches on request headers (only HTTPRouteGroup matches do): if not,
    #: the middleware need not decode them.
    reads_headers: bool = field(init=False)

    def __post_init__(self) -> None:
        # Derived once per snapshot, read on every request: plain attributes, not properties.
        in_force = bool(self.targets or self.deny or self.allow)
        object.__setattr__(self, "in_force", in_force or self.mode is not AccessControl.OPEN)
        reads = any(m.headers for t in self.targets for r in t.rules for m in r.matches or ())
        object.__setattr__(self, "reads_headers", reads)

    @classmethod
    def build(cls, snapshot: Snapshot, service: ServiceDef) -> AuthzIndex:
        account = (service.service_account or service.name, service.namespace)
        targets = tuple(
            _resolve(snapshot, t) for t in snapshot.traffic_targets if t.destination == account
        )
        applies = [
            p
            for p in snapshot.authorization_policies
            if p.namespace == service.namespace and p.service in (None, service.key)
        ]
        return cls(
            service,
            snapshot.mesh.trust_domain,
            snapshot.mesh.access_control,
            targets,
            tuple(p for p in applies if p.action is AuthzAction.DENY),
            tuple(p for p in applies if p.action is AuthzAction.ALLOW),
        )


def _resolve(snapshot: Snapshot, target: TrafficTarget) -> _Target:
    rules: list[_TargetRule] = []
    for i, rule in enumerate(target.rules):
        label = f"TrafficTarget {target.namespace}/{target.name} rule {i}"
        if rule.kind == "UDPRoute":
            continue  # UDP traffic: meshlib carries HTTP only, so the rule admits no request
        if rule.kind != "HTTPRouteGroup":
            # A TCPRoute grants connection-level access: every request on it is admitted.
            rules.append(_TargetRule(label, None))
            continue
        group = snapshot.route_groups.get(f"{rule.name}.{target.namespace}")
        if group is None:  # pragma: no cover - the loader rejects dangling references
            continue
        wanted = set(rule.matches)
        rules.append(
            _TargetRule(label, tuple(m for m in group.matches if not wanted or m.name in wanted))
        )
    return _Target(target, frozenset(target.sources), tuple(rules))


def index_for(router: Router, service: ServiceDef) -> AuthzIndex:
    """The index for ``service`` under ``router``'s snapshot, memoised on the router."""
    key = ("authz", service.key, service.service_account)
    index: AuthzIndex | None = router.derived.get(key)
    if index is None:
        index = router.derived[key] = AuthzIndex.build(router.snapshot, service)
    return index


# --- evaluation --------------------------------------------------------------------------------


def authorize(
    source: Snapshot | AuthzIndex,
    destination: ServiceDef,
    caller: SpiffeID | None,
    method: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    jwt_claims: Mapping[str, Any] | None = None,
) -> AuthzVerdict:
    """Decide whether ``caller`` may send ``method path`` to ``destination``.

    ``headers`` have lower-case names (for HTTPRouteGroup header matches); ``jwt_claims`` are
    the claims of an already validated token (``None``: no token).
    """
    index = source if isinstance(source, AuthzIndex) else AuthzIndex.build(source, destination)
    mode = index.mode
    if not index.in_force:  # nothing to enforce: the path is not even looked at
        return AuthzVerdict(True, _OPEN, mode.value, False, path)
    normal = normalize_path(path)
    if normal is None:
        return _decide(mode, False, f"path {path!r} cannot be normalised safely", None)
    req = _Request(caller, index.trust_domain, method.upper(), normal, headers or {}, jwt_claims)
    for policy in index.deny:
        i = _first_match(policy.rules, req)
        if i is not None:
            return _decide(mode, False, f"{_name(policy)} rule {i} (DENY)", normal)
    for policy in index.allow:
        i = _first_match(policy.rules, req)
        if i is not None:
            return _decide(mode, True, f"{_name(policy)} rule {i}", normal)
    for target in index.targets:
        if req.account not in target.sources:
            continue
        for rule in target.rules:
            if rule.matches is None or any(
                match_http(m, req.method, normal, req.headers) for m in rule.matches
            ):
                return _decide(mode, True, rule.label, normal)
    if index.allow or index.targets:
        names = [_name(p) for p in index.allow] + [
            f"TrafficTarget {t.target.namespace}/{t.target.name}" for t in index.targets
        ]
        return _decide(mode, False, "no rule allows it; checked: " + ", ".join(names), normal)
    if mode is AccessControl.OPEN:
        return _decide(mode, True, _OPEN, normal)
    return _decide(mode, False, f"default: deny (accessControl: {mode.value})", normal)


_OPEN = "default: open (no TrafficTarget or AuthorizationPolicy applies)"


def _decide(mode: AccessControl, allowed: bool, rule: str, path: str | None) -> AuthzVerdict:
    audit = mode is AccessControl.AUDIT
    return AuthzVerdict(allowed or audit, rule, mode.value, not allowed, path)


def _name(policy: AuthorizationPolicy) -> str:
    return f"AuthorizationPolicy {policy.namespace}/{policy.name}"


class _Request:
    """The facts rules are matched against, computed once per request."""

    __slots__ = ("account", "claims", "headers", "method", "namespace", "path", "principal")

    def __init__(
        self,
        caller: SpiffeID | None,
        trust_domain: str,
        method: str,
        path: str,
        headers: Mapping[str, str],
        claims: Mapping[str, Any] | None,
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.claims = claims
        #: Istio principal (``td/path``) of any verified caller; ``None``: unauthenticated.
        self.principal = None if caller is None else f"{caller.trust_domain}{caller.path}"
        self.account: tuple[str, str] | None = None
        self.namespace: str | None = None
        if caller is not None and caller.trust_domain == trust_domain:
            parts = caller.path.split("/")
            if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
                self.namespace = parts[2]
                self.account = (parts[4], parts[2])


def _first_match(rules: Iterable[AuthorizationPolicyRule], req: _Request) -> int | None:
    for i, rule in enumerate(rules):
        if (
            (not rule.sources or any(_source(s, req) for s in rule.sources))
            and (not rule.operations or any(_operation(o, req) for o in rule.operations))
            and all(_condition(c, req) for c in rule.conditions)
        ):
            return i
    return None


def _glob(patterns: Iterable[str], value: str | None) -> bool:
    if value is None:
        return False
    for p in patterns:
        if p == "*" or p == value:
            return True
        if p.endswith("*") and value.startswith(p[:-1]):
            return True
        if p.startswith("*") and value.endswith(p[1:]):
            return True
    return False


def _request_principal(claims: Mapping[str, Any] | None) -> str | None:
    if not claims:
        return None
    iss, sub = claims.get("iss"), claims.get("sub")
    return f"{iss}/{sub}" if isinstance(iss, str) and isinstance(sub, str) else None


def _source(s: AuthzSource, req: _Request) -> bool:
    if s.principals is not None and not _glob(s.principals, req.principal):
        return False
    if s.namespaces is not None and not _glob(s.namespaces, req.namespace):
        return False
    return s.request_principals is None or _glob(
        s.request_principals, _request_principal(req.claims)
    )


def _operation(o: AuthzOperation, req: _Request) -> bool:
    if o.methods is not None and req.method not in o.methods:
        return False
    return o.paths is None or _glob(o.paths, req.path)


def _condition(c: AuthzCondition, req: _Request) -> bool:
    value: Any = req.claims
    for name in c.claim:
        if not isinstance(value, Mapping):
            return False
        value = value.get(name)
    if isinstance(value, str):
        return _glob(c.values, value)
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, str) and _glob(c.values, v) for v in value)
    return False
