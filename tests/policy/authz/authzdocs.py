"""Policy texts and helpers shared by the authorization tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshlib.config.loader import load_text
from meshlib.config.model import Snapshot
from meshlib.identity.spiffe import SpiffeID
from meshlib.policy.authz import AuthzVerdict, authorize

TD = "shop.test"


def mesh(access: str = "open") -> str:
    return (
        "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: mesh}\n"
        f"spec: {{trustDomain: {TD}, accessControl: {access}}}\n"
    )


SERVICES = """
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews}
spec: {serviceAccount: reviews-sa}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: ratings}
spec: {}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: details}
spec: {}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: billing, namespace: pay}
spec: {}
"""

ROUTES = """
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: api}
spec:
  matches:
  - {name: reads, methods: [GET, HEAD], pathRegex: "/reviews(/.*)?"}
  - {name: writes, methods: [POST], pathRegex: "/reviews"}
  - {name: beta, pathRegex: "/beta.*", headers: {x-beta: "yes"}}
"""

#: v1alpha1: top-level destination/specs/sources. ratings may read reviews.
TARGET_V1 = """
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha1
metadata: {name: ratings-reads}
destination: {kind: ServiceAccount, name: reviews-sa, namespace: default, port: "9080"}
specs:
- kind: HTTPRouteGroup
  name: api
  matches: [reads]
sources:
- {kind: ServiceAccount, name: ratings, namespace: default}
"""


def target_spec(version: int, sources: str = "ratings", matches: str = "[reads]") -> str:
    """A v1alpha2/3 TrafficTarget (spec.rules form) to the reviews service account."""
    items = "\n".join(
        f"  - {{kind: ServiceAccount, name: {s.split('/')[-1]}"
        + (f", namespace: {s.split('/')[0]}}}" if "/" in s else "}")
        for s in sources.split(",")
    )
    return f"""
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha{version}
metadata: {{name: t{version}}}
spec:
  destination: {{kind: ServiceAccount, name: reviews-sa}}
  rules:
  - kind: HTTPRouteGroup
    name: api
    matches: {matches}
  sources:
{items}
"""


def load(*docs: str) -> Snapshot:
    return load_text("\n---\n".join(d.strip("\n") for d in docs))


def sa(name: str, ns: str = "default", td: str = TD) -> SpiffeID:
    return SpiffeID(td, f"/ns/{ns}/sa/{name}")


def decide(
    snapshot: Snapshot,
    caller: SpiffeID | None,
    method: str = "GET",
    path: str = "/reviews/1",
    *,
    service: str = "reviews.default",
    headers: Mapping[str, str] | None = None,
    claims: Mapping[str, Any] | None = None,
) -> AuthzVerdict:
    return authorize(
        snapshot, snapshot.services[service], caller, method, path, headers, jwt_claims=claims
    )
