"""The documents the gateway tests share (the Gateway edge/edge, the gateway's mesh policy, the
edge's JWT and authorization policy, a TLS Secret) and the start-up of a GatewayServer in front of
them, so each test file states only what is particular to it (issue 14)."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

import meshlib
from meshlib.config.gatewaykind import load_gateway_config
from meshlib.gateway.app import GatewayApp
from meshlib.gateway.serve import EdgeTimeouts, GatewayServer
from meshlib.gateway.tls import listener_contexts
from tests.gateway.gwcerts import Pair
from tests.gateway.running import RunningGateway
from tests.inbound.origin.conftest import ISSUER, inline_rule, jwks, rsa_key
from tests.mtls.conftest import mesh_text

#: The head of the Gateway every test uses, edge/edge of class meshlib: its listeners follow.
GATEWAY_HEAD = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: edge}
spec:
  gatewayClassName: meshlib
  listeners:
"""


def web_gateway(*, hostnames: str = "", rules: str = "") -> str:
    """The Gateway with one HTTP listener ``web`` on port 80 and an HTTPRoute edge/web sending
    everything to Service shop/web:8080; ``rules`` (YAML list items) go before that catch-all rule,
    ``hostnames`` (a YAML flow list) restricts the route."""
    return (
        GATEWAY_HEAD
        + """\
  - {name: web, port: 80, protocol: HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: edge}
spec:
  parentRefs: [{name: edge}]
"""
        + (f"  hostnames: {hostnames}\n" if hostnames else "")
        + "  rules:\n"
        + rules
        + "  - backendRefs: [{name: web, namespace: shop, port: 8080}]\n"
    )


def service(name: str, namespace: str, port: int | None) -> str:
    """A mesh Service document: one loopback endpoint on ``port``, or none."""
    endpoints = "[]" if port is None else f'[{{address: "127.0.0.1:{port}"}}]'
    return (
        f"---\napiVersion: meshlib/v1\nkind: Service\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec: {{endpoints: {endpoints}}}\n"
    )


def gateway_policy(backends: Mapping[str, int], *, mtls: str = "disable", extra: str = "") -> str:
    """The gateway's mesh policy: the Mesh (``mtls``), the gateway's own Service edge/gateway and
    one Service per ``"namespace/name": port`` of ``backends``, then ``extra``."""
    docs = [service(key.split("/")[1], key.split("/")[0], port) for key, port in backends.items()]
    return mesh_text(mtls) + service("gateway", "edge", None) + "".join(docs) + extra


#: A RequestAuthentication of the gateway service: tokens of the test issuer's key rsa-1.
EDGE_JWT = f"""
---
apiVersion: meshlib/v1
kind: RequestAuthentication
metadata: {{name: users, namespace: edge}}
spec:
  target: {{service: gateway}}
  jwtRules:
  - {inline_rule(jwks((rsa_key(), "rsa-1")))}
"""

#: EDGE_JWT, and an AuthorizationPolicy admitting alice only.
EDGE_AUTH = (
    EDGE_JWT
    + f"""---
apiVersion: meshlib/v1
kind: AuthorizationPolicy
metadata: {{name: users, namespace: edge}}
spec:
  target: {{service: gateway}}
  rules:
  - from: [{{requestPrincipals: ["{ISSUER}/alice"]}}]
"""
)


def tls_secret(name: str, pair: Pair) -> str:
    """A kubernetes.io/tls Secret edge/``name`` holding ``pair``, base64 in ``data``."""
    crt = base64.b64encode(pair.cert_pem).decode()
    key = base64.b64encode(pair.key_pem).decode()
    return (
        f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: edge}}\n"
        f"type: kubernetes.io/tls\ndata:\n  tls.crt: {crt}\n  tls.key: {key}\n"
    )


def gateway_mesh(policy: str, **options: Any) -> meshlib.Mesh:
    """The mesh of the gateway service edge/gateway (seeded, its own metrics registry)."""
    return meshlib.Mesh.from_text(
        policy, service="gateway", namespace="edge", seed=7, registry=CollectorRegistry(), **options
    )


def start_gateway(
    mesh: meshlib.Mesh,
    gateway: str,
    *,
    ports: Mapping[int, int],
    timeouts: EdgeTimeouts = EdgeTimeouts(),
    **app_options: Any,
) -> RunningGateway:
    """The first Gateway of ``gateway`` (its HTTPS listeners with their Secrets' certificates)
    served by a GatewayServer on ``ports`` (listener port -> bound port, 0 for any), calling
    through ``mesh``; ``app_options`` go to GatewayApp. The caller stops it."""
    config = load_gateway_config([("gateway.yaml", gateway)])
    edge = config.gateways[0]
    transport = mesh.async_transport()
    app = GatewayApp(edge, config, mesh=mesh, transport=transport, **app_options)
    contexts = listener_contexts(edge, config)
    server = GatewayServer(app, mesh, contexts=contexts, ports=ports, timeouts=timeouts)
    return RunningGateway(server, transport)


@contextlib.contextmanager
def running_gateway(
    policy: str, gateway: str, *, mesh_options: Mapping[str, Any] | None = None, **options: Any
) -> Iterator[RunningGateway]:
    """:func:`start_gateway` with a mesh of its own from ``policy``, both stopped on exit."""
    mesh = gateway_mesh(policy, **(mesh_options or {}))
    try:
        running = start_gateway(mesh, gateway, **options)
        try:
            yield running
        finally:
            running.stop()
    finally:
        mesh.close()
