"""Ingress-mode HTTPRoute tables (meshlib.policy.routes.IngressIndex): hostnames and listeners.

Pure: routes from policy text, no sockets.
"""

from __future__ import annotations

import pytest

from meshlib.config.loader import load_text
from meshlib.config.model import HTTPRoute
from meshlib.policy.routes import IngressIndex, host_specificity

SERVICES = """
apiVersion: meshlib/v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {port: 80, endpoints: [{address: "127.0.0.1:1"}]}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {port: 80, endpoints: [{address: "127.0.0.1:2"}]}
"""


def _route(name: str, hostnames: list[str], path: str, backend: str, **extra: str) -> str:
    hosts = "[" + ", ".join(f'"{h}"' for h in hostnames) + "]"
    created = f"\n  creationTimestamp: '{extra['created']}'" if "created" in extra else ""
    return f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: {name}
  namespace: shop{created}
spec:
  parentRefs: [{{name: edge}}]
  hostnames: {hosts}
  rules:
  - matches: [{{path: {{type: PathPrefix, value: "{path}"}}}}]
    backendRefs: [{{name: {backend}, port: 80}}]
"""


def _index(*routes: str) -> tuple[IngressIndex, tuple[HTTPRoute, ...]]:
    snapshot = load_text(SERVICES + "".join(routes))
    loaded = snapshot.http_routes
    return IngressIndex(loaded, {"https": loaded}, snapshot.services), loaded


def _winner(index: IngressIndex, host: str, path: str = "/") -> str | None:
    table = index.table("https", host)
    if table is None:
        return None
    found = table.select("GET", path, "", {})
    return None if found is None else found.rule.route.name


@pytest.mark.parametrize(
    ("hostnames", "host", "accepted"),
    [
        ([], "anything.example", True),
        (["shop.example.com"], "shop.example.com", True),
        (["shop.example.com"], "other.example.com", False),
        (["*.example.com"], "a.example.com", True),
        (["*.example.com"], "a.b.example.com", True),  # a suffix of one or more labels
        (["*.example.com"], "example.com", False),
        (["*.example.com"], "badexample.com", False),
    ],
)
def test_hostnames_accept_a_host(hostnames: list[str], host: str, accepted: bool) -> None:
    assert (host_specificity(hostnames, host) is not None) is accepted


def test_an_exact_hostname_beats_a_wildcard_which_beats_none_whatever_the_path() -> None:
    index, _ = _index(
        _route("catch-all", [], "/api", "api"),
        _route("wild", ["*.example.com"], "/", "web"),
        _route("exact", ["shop.example.com"], "/", "web"),
    )
    # The exact-hostname route wins although catch-all's prefix is longer.
    assert _winner(index, "shop.example.com", "/api/x") == "exact"
    assert _winner(index, "blog.example.com", "/api/x") == "wild"
    assert _winner(index, "other.test", "/api/x") == "catch-all"
    assert _winner(index, "other.test", "/x") is None  # catch-all's prefix does not match


def test_a_host_no_route_accepts_has_no_table() -> None:
    index, _ = _index(_route("exact", ["shop.example.com"], "/", "web"))
    assert index.table("https", "evil.example.com") is None
    assert index.table("no-such-listener", "shop.example.com") is None


def test_ties_go_to_the_older_route_then_the_name() -> None:
    index, _ = _index(
        _route("b-young", ["shop.example.com"], "/", "web", created="2025-02-01T00:00:00Z"),
        _route("a-old", ["shop.example.com"], "/", "api", created="2025-01-01T00:00:00Z"),
    )
    assert _winner(index, "shop.example.com") == "a-old"
    index, _ = _index(
        _route("b", ["shop.example.com"], "/", "web"),
        _route("a", ["shop.example.com"], "/", "api"),
    )
    assert _winner(index, "shop.example.com") == "b"  # no timestamps: load order is age


def test_listeners_see_only_their_routes_and_undeclared_backends_are_invalid() -> None:
    snapshot = load_text(
        SERVICES + _route("web", [], "/", "web") + _route("ghost", [], "/ghost", "nowhere")
    )
    web, ghost = snapshot.http_routes
    index = IngressIndex(
        snapshot.http_routes, {"http": [web], "https": [web, ghost]}, snapshot.services
    )
    plain = index.table("http", "x")
    assert plain is not None
    found = plain.select("GET", "/ghost", "", {})
    assert found is not None and found.rule.route.name == "web"
    secure = index.table("https", "x")
    assert secure is not None
    found = secure.select("GET", "/ghost", "", {})
    assert found is not None and found.rule.route.name == "ghost"
    assert [b.service for b in found.rule.backends] == [None]  # its share is answered 500
