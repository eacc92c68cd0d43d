"""The SMI kinds' part of the policy model (HTTPRouteGroup, TCPRoute, UDPRoute, TrafficSplit,
TrafficTarget), built by :mod:`meshlib.config.smi`.

Kept out of :mod:`meshlib.config.model`, which re-exports every name, so a policy without these
kinds does not pay for creating their dataclasses at import (start-up, issue 15); the same
frozen, slotted values as the rest of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlib.config.model import Origin, Pattern


@dataclass(frozen=True, slots=True)
class HTTPMatch:
    """One SMI HTTPRouteGroup match. ``None`` fields match anything.

    ``path_regex`` is anchored at the start of the path (SMI semantics), compiled with RE2.
    ``methods`` holds upper-case method names; ``"*"`` in the manifest becomes ``None``.
    ``headers`` maps lower-case header names to RE2 patterns matched against the value.
    """

    name: str
    path_regex: Pattern | None = None
    methods: frozenset[str] | None = None
    headers: tuple[tuple[str, Pattern], ...] = ()


@dataclass(frozen=True, slots=True)
class RouteGroup:
    """SMI HTTPRouteGroup."""

    name: str
    namespace: str
    matches: tuple[HTTPMatch, ...]
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class TCPRoute:
    name: str
    namespace: str
    ports: tuple[int, ...] = ()
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class UDPRoute:
    """SMI UDPRoute (specs.smi-spec.io/v1alpha4): parsed so a TrafficTarget may name it; meshlib
    carries HTTP only, so it admits no request (see authz)."""

    name: str
    namespace: str
    ports: tuple[int, ...] = ()
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class SplitBackend:
    service: str  # service key "name.namespace"
    weight: int  # relative; v1alpha1 quantities are converted to milli-units


@dataclass(frozen=True, slots=True)
class SplitMatchRef:
    """A reference from a TrafficSplit to (all or some) matches of an HTTPRouteGroup."""

    group: str  # route group key "name.namespace"
    names: tuple[str, ...] = ()  # empty: every match of the group


@dataclass(frozen=True, slots=True)
class Split:
    """SMI TrafficSplit. Requests that do not match ``matches`` (when set) go to the root."""

    name: str
    namespace: str
    root: str  # service key
    backends: tuple[SplitBackend, ...]
    matches: tuple[SplitMatchRef, ...] = ()
    origin: Origin | None = None


@dataclass(frozen=True, slots=True)
class TrafficTargetRule:
    kind: str  # "HTTPRouteGroup" | "TCPRoute" | "UDPRoute"
    name: str
    matches: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TrafficTarget:
    """SMI TrafficTarget (parsed and validated here; enforced by the inbound side)."""

    name: str
    namespace: str
    destination: tuple[str, str]  # (service account, namespace)
    sources: tuple[tuple[str, str], ...]
    rules: tuple[TrafficTargetRule, ...]
    origin: Origin | None = None
