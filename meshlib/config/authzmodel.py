"""The AuthorizationPolicy kind's part of the policy model, built by
:mod:`meshlib.config.authzkind` and enforced by :mod:`meshlib.policy.authz`.

Kept out of :mod:`meshlib.config.model`, which re-exports every name, so a policy without the
kind does not pay for creating its dataclasses at import (start-up, issue 15).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlib.config.model import Origin


class AuthzAction(str, enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


@dataclass(frozen=True, slots=True)
class AuthzSource:
    """One ``from`` entry of an AuthorizationPolicy rule: every set field must match (AND);
    within a field any value may match (OR). ``None``: the field is not constrained.

    Values are glob patterns: exact, ``prefix*``, ``*suffix`` or ``*`` (present).
    ``principals`` are SPIFFE IDs without the scheme (``td/ns/x/sa/y``, Istio style).
    """

    principals: tuple[str, ...] | None = None
    namespaces: tuple[str, ...] | None = None
    request_principals: tuple[str, ...] | None = None  # "iss/sub" of the validated JWT


@dataclass(frozen=True, slots=True)
class AuthzOperation:
    """One ``to`` entry: upper-case methods and path globs (matched on the normalised path)."""

    methods: frozenset[str] | None = None
    paths: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class AuthzCondition:
    """One ``when`` entry: the JWT claim at ``claim`` (nested names) has one of ``values``."""

    key: str  # as written, e.g. "request.auth.claims[iss]"
    claim: tuple[str, ...]
    values: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuthorizationPolicyRule:
    """A rule matches when its ``sources``, ``operations`` and ``conditions`` all match; an
    empty ``sources`` (or ``operations``) matches any source (operation)."""

    sources: tuple[AuthzSource, ...] = ()
    operations: tuple[AuthzOperation, ...] = ()
    conditions: tuple[AuthzCondition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """meshlib/v1 AuthorizationPolicy (Istio semantics: DENY beats ALLOW; once an ALLOW policy
    applies to a destination, a request must match one). ``service`` ``None``: every service of
    ``namespace``."""

    name: str
    namespace: str
    service: str | None  # service key "name.namespace" when set
    action: AuthzAction
    rules: tuple[AuthorizationPolicyRule, ...]
    origin: Origin | None = None
