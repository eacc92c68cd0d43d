"""The Gateway API mesh conformance tests' expected request → backend/status tables, as data.

Transcribed once, by hand, from the upstream Go tests ``conformance/tests/mesh/*.go`` of
kubernetes-sigs/gateway-api at the commit named in tests/data/gateway-api/README.md (the
manifests themselves are vendored unchanged there). No Go code is copied: each upstream
``http.ExpectedResponse`` becomes one :class:`Case`, with upstream's defaults made explicit
(host ``echo``, method ``GET``, status 200, client = the ``echo-v1`` app in namespace
``gateway-conformance-mesh``).

What upstream's mesh checker (``conformance/utils/echo/pod.go`` ``compareRequest``) verifies:
the status, the request headers the backend saw (present with a value, or absent), the
response headers (present or absent) and that the answering pod's name starts with the
backend. It does NOT compare the path the backend saw nor the redirect's Location: those
are recorded here (``backend_path``, ``redirect``) because HTTPRoute's semantics define them,
and a runner may check them, but upstream passes without them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

#: Folder of the vendored upstream files, relative to the repository root.
DATA_DIR = "tests/data/gateway-api"
MESH_NAMESPACE = "gateway-conformance-mesh"
CONSUMER_NAMESPACE = "gateway-conformance-mesh-consumer"
#: Placeholder in ``Case.host`` for the address of one echo-v2 instance (upstream sends
#: to the pod IP directly, bypassing the Service; a runner substitutes the instance address).
ECHO_V2_POD = "{pod:echo-v2}"

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Redirect:
    """Parts of the expected ``Location``; ``None`` means upstream leaves the part unchecked."""

    scheme: str | None = None
    host: str | None = None
    port: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class Case:
    """One upstream expected response: a request sent from a mesh client and what must come back."""

    test: str  # upstream ShortName
    manifest: str | None  # vendored manifest path below DATA_DIR; None: the base manifests only
    path: str = "/"  # path plus query string, as sent
    host: str = "echo"  # authority the client calls (a Service name, maybe with :port)
    method: str = "GET"
    headers: Headers = ()  # request headers (a "Host" here overrides the Host header only)
    status: int = 200
    backend: str | None = None  # expected answering service; None: any (upstream Backend "")
    client_namespace: str = MESH_NAMESPACE
    backend_path: str | None = None  # path the backend must see (rewrites); not checked upstream
    backend_headers: Headers = ()  # request headers the backend must see, values comma-joined
    backend_absent: tuple[str, ...] = ()  # request headers the backend must not see
    response_headers: Headers = ()
    response_absent: tuple[str, ...] = ()
    redirect: Redirect | None = None  # not checked upstream
    name: str = ""  # upstream TestCaseName, when it gives one


M = "conformance/tests/mesh/"

_BASIC = [
    Case("MeshBasic", None, backend=None),
]

_SIMPLE = [
    Case("MeshHTTPRouteSimpleSameNamespace", M + "httproute-simple-same-namespace.yaml",
         backend="echo-v1", name="Simple HTTP request should reach infra-backend"),
]  # fmt: skip

_SPLIT = [
    Case("MeshTrafficSplit", M + "mesh-split.yaml", path="/v1", backend="echo-v1"),
    Case("MeshTrafficSplit", M + "mesh-split.yaml", path="/v2", backend="echo-v2"),
]

_MATCHING = [
    Case("MeshHTTPRouteMatching", M + "httproute-matching.yaml", path=p, headers=h, backend=b)
    for p, h, b in [
        ("/", (), "echo-v1"),
        ("/example", (), "echo-v1"),
        ("/", (("Version", "one"),), "echo-v1"),
        ("/v2", (), "echo-v2"),
        ("/v2/example", (), "echo-v2"),
        ("/", (("Version", "two"),), "echo-v2"),
        ("/v2/", (), "echo-v2"),
        ("/v2example", (), "echo-v1"),
        ("/foo/v2/example", (), "echo-v1"),
    ]
]

_QUERY = [
    Case("MeshHTTPRouteQueryParamMatching", M + "httproute-query-param-matching.yaml",
         path=p, headers=h, status=s, backend=b)
    for p, h, s, b in [
        ("/?animal=whale", (), 200, "echo-v1"),
        ("/?animal=dolphin", (), 200, "echo-v2"),
        ("/?animal=whale&otherparam=irrelevant", (), 200, "echo-v1"),
        ("/?animal=dolphin&color=yellow", (), 200, "echo-v2"),
        ("/?color=blue", (), 404, None),
        ("/?animal=dog", (), 404, None),
        ("/?animal=whaledolphin", (), 404, None),
        ("/", (), 404, None),
        # combinations with core match types
        ("/path1?animal=whale", (), 200, "echo-v1"),
        ("/?animal=whale", (("version", "one"),), 200, "echo-v2"),
        # (cond1 AND cond2) OR (cond3 AND cond4 AND cond5)
        ("/path3?animal=shark", (), 200, "echo-v1"),
        ("/path4?animal=kraken", (("version", "three"),), 200, "echo-v1"),
        ("/?animal=shark", (), 404, None),
        ("/path4?animal=kraken", (), 404, None),
        # precedence: a path match beats a query-param match
        ("/path5?animal=hydra", (), 200, "echo-v1"),
    ]
]  # fmt: skip

_NAMED = [
    Case("MeshHTTPRouteNamedRule", M + "httproute-named-rule.yaml", path="/named",
         backend="echo-v1", backend_path="/named"),
    # Upstream writes ExpectedRequest path "/named" here too, a slip its mesh checker never
    # reads (it does not compare paths); no filter rewrites, so the backend sees "/unnamed".
    Case("MeshHTTPRouteNamedRule", M + "httproute-named-rule.yaml", path="/unnamed",
         backend="echo-v2", backend_path="/unnamed"),
]  # fmt: skip

_WEIGHT = [
    # Upstream first waits for one 200, then checks the share of a batch of answers.
    Case("MeshHTTPRouteWeight", M + "httproute-weight.yaml", backend=None),
]
#: Expected share of answers per backend, per weighted test (upstream weight.TestWeighted-
#: DistributionBatch: a batch of requests, each backend's share within a tolerance).
WEIGHTS: dict[str, dict[str, float]] = {
    "MeshHTTPRouteWeight": {"echo-v1": 0.7, "echo-v2": 0.3},
}


def _redirect(test: str, manifest: str, path: str, status: int, to: Redirect) -> Case:
    return Case(test, M + manifest, path=path, status=status, redirect=to)


_REDIRECTS = [
    _redirect("MeshHTTPRoute303Redirect", "httproute-303-redirect.yaml", "/redirect", 303,
              Redirect(path="/redirect")),
    _redirect("MeshHTTPRoute307Redirect", "httproute-307-redirect.yaml", "/temporary", 307,
              Redirect(path="/temporary")),
    _redirect("MeshHTTPRoute308Redirect", "httproute-308-redirect.yaml", "/permanent", 308,
              Redirect(path="/permanent")),
    _redirect("MeshHTTPRouteRedirectHostAndStatus", "httproute-redirect-host-and-status.yaml",
              "/hostname-redirect", 302, Redirect(host="example.org")),
    _redirect("MeshHTTPRouteRedirectHostAndStatus", "httproute-redirect-host-and-status.yaml",
              "/host-and-status", 301, Redirect(host="example.org")),
    _redirect("MeshHTTPRouteRedirectPath", "httproute-redirect-path.yaml",
              "/original-prefix/lemon", 302, Redirect(path="/replacement-prefix/lemon")),
    _redirect("MeshHTTPRouteRedirectPath", "httproute-redirect-path.yaml",
              "/full/path/original", 302, Redirect(path="/full-path-replacement")),
    _redirect("MeshHTTPRouteRedirectPath", "httproute-redirect-path.yaml",
              "/path-and-host", 302, Redirect(host="example.org", path="/replacement-prefix")),
    _redirect("MeshHTTPRouteRedirectPath", "httproute-redirect-path.yaml",
              "/path-and-status", 301, Redirect(path="/replacement-prefix")),
    _redirect("MeshHTTPRouteRedirectPath", "httproute-redirect-path.yaml",
              "/full-path-and-host", 302, Redirect(host="example.org", path="/replacement-full")),
    _redirect("MeshHTTPRouteRedirectPath", "httproute-redirect-path.yaml",
              "/full-path-and-status", 301, Redirect(path="/replacement-full")),
    _redirect("MeshHTTPRouteRedirectPort", "httproute-redirect-port.yaml",
              "/port", 302, Redirect(port="8083")),
    _redirect("MeshHTTPRouteRedirectPort", "httproute-redirect-port.yaml",
              "/port-and-host", 302, Redirect(host="example.org", port="8083")),
    _redirect("MeshHTTPRouteRedirectPort", "httproute-redirect-port.yaml",
              "/port-and-status", 301, Redirect(port="8083")),
    _redirect("MeshHTTPRouteRedirectPort", "httproute-redirect-port.yaml",
              "/port-and-host-and-status", 302, Redirect(host="example.org", port="8083")),
    _redirect("MeshHTTPRouteRedirectScheme", "httproute-redirect-scheme.yaml",
              "/scheme", 302, Redirect(scheme="https")),
    _redirect("MeshHTTPRouteRedirectScheme", "httproute-redirect-scheme.yaml",
              "/scheme-and-host", 302, Redirect(scheme="https", host="example.org")),
    _redirect("MeshHTTPRouteRedirectScheme", "httproute-redirect-scheme.yaml",
              "/scheme-and-status", 301, Redirect(scheme="https")),
    _redirect("MeshHTTPRouteRedirectScheme", "httproute-redirect-scheme.yaml",
              "/scheme-and-host-and-status", 302, Redirect(scheme="https", host="example.org")),
]  # fmt: skip

# One table, two upstream tests: MeshHTTPRouteBackendRequestHeaderModifier reuses
# MeshHTTPRouteRequestHeaderModifier's Test with the filters moved onto the backendRefs.
_HEADER_MODIFIER = [
    Case("MeshHTTPRouteRequestHeaderModifier", M + "httproute-request-header-modifier.yaml",
         path="/set", headers=(("Some-Other-Header", "val"),), backend="echo-v1",
         backend_path="/set",
         backend_headers=(("Some-Other-Header", "val"),
                          ("X-Header-Set", "set-overwrites-values"))),
    Case("MeshHTTPRouteRequestHeaderModifier", M + "httproute-request-header-modifier.yaml",
         path="/set",
         headers=(("Some-Other-Header", "val"), ("X-Header-Set", "some-other-value")),
         backend="echo-v1", backend_path="/set",
         backend_headers=(("Some-Other-Header", "val"),
                          ("X-Header-Set", "set-overwrites-values"))),
    Case("MeshHTTPRouteRequestHeaderModifier", M + "httproute-request-header-modifier.yaml",
         path="/add", headers=(("Some-Other-Header", "val"),), backend="echo-v1",
         backend_path="/add",
         backend_headers=(("Some-Other-Header", "val"), ("X-Header-Add", "add-appends-values"))),
    Case("MeshHTTPRouteRequestHeaderModifier", M + "httproute-request-header-modifier.yaml",
         path="/add",
         headers=(("Some-Other-Header", "val"), ("X-Header-Add", "some-other-value")),
         backend="echo-v1", backend_path="/add",
         backend_headers=(("Some-Other-Header", "val"),
                          ("X-Header-Add", "some-other-value,add-appends-values"))),
    Case("MeshHTTPRouteRequestHeaderModifier", M + "httproute-request-header-modifier.yaml",
         path="/remove", headers=(("X-Header-Remove", "val"),), backend="echo-v1",
         backend_path="/remove", backend_absent=("X-Header-Remove",)),
    Case("MeshHTTPRouteRequestHeaderModifier", M + "httproute-request-header-modifier.yaml",
         path="/multiple",
         headers=(("X-Header-Set-2", "set-val-2"), ("X-Header-Add-2", "add-val-2"),
                  ("X-Header-Remove-2", "remove-val-2"), ("Another-Header", "another-header-val")),
         backend="echo-v1", backend_path="/multiple",
         backend_headers=(("X-Header-Set-1", "header-set-1"), ("X-Header-Set-2", "header-set-2"),
                          ("X-Header-Add-1", "header-add-1"),
                          ("X-Header-Add-2", "add-val-2,header-add-2"),
                          ("X-Header-Add-3", "header-add-3"),
                          ("Another-Header", "another-header-val")),
         backend_absent=("X-Header-Remove-1", "X-Header-Remove-2")),
    # The filter names headers canonically, the request in lower case.
    Case("MeshHTTPRouteRequestHeaderModifier", M + "httproute-request-header-modifier.yaml",
         path="/case-insensitivity",
         headers=(("x-header-set", "original-val-set"), ("x-header-add", "original-val-add"),
                  ("x-header-remove", "original-val-remove"),
                  ("Another-Header", "another-header-val")),
         backend="echo-v1", backend_path="/case-insensitivity",
         backend_headers=(("X-Header-Set", "header-set"),
                          ("X-Header-Add", "original-val-add,header-add"),
                          ("Another-Header", "another-header-val")),
         backend_absent=("x-header-remove", "X-Header-Remove")),
]  # fmt: skip
_HEADER_MODIFIER += [
    replace(c, test="MeshHTTPRouteBackendRequestHeaderModifier",
            manifest=M + "httproute-request-header-modifier-backend.yaml")
    for c in list(_HEADER_MODIFIER)
]  # fmt: skip

_REWRITE_HEADERS = (
    ("X-Header-Remove", "remove-val"),
    ("X-Header-Add-Append", "append-val-1"),
    ("X-Header-Set", "set-val"),
)
_REWRITTEN_HEADERS = (
    ("X-Header-Add", "header-val-1"),
    ("X-Header-Add-Append", "append-val-1,header-val-2"),
    ("X-Header-Set", "set-overwrites-values"),
)
_REWRITE = [
    Case("MeshHTTPRouteRewritePath", M + "httproute-rewrite-path.yaml", path=p, headers=h,
         backend="echo-v1", backend_path=bp, backend_headers=bh, backend_absent=ba)
    for p, h, bp, bh, ba in [
        ("/prefix/one/two", (), "/one/two", (), ()),
        ("/strip-prefix/three", (), "/three", (), ()),
        ("/strip-prefix", (), "/", (), ()),
        ("/full/one/two", (), "/one", (), ()),
        ("/full/rewrite-path-and-modify-headers/test", _REWRITE_HEADERS, "/test",
         _REWRITTEN_HEADERS, ("X-Header-Remove",)),
        ("/prefix/rewrite-path-and-modify-headers/one", _REWRITE_HEADERS, "/prefix/one",
         _REWRITTEN_HEADERS, ("X-Header-Remove",)),
    ]
]  # fmt: skip

_CONSUMER = [
    Case("MeshConsumerRoute", M + "mesh-consumer-route.yaml",
         host="echo-v1.gateway-conformance-mesh", client_namespace=CONSUMER_NAMESPACE,
         backend="echo-v1", response_headers=(("X-Header-Set", "set"),),
         name="request from consumer route's namespace modified by HTTPRoute"),
    Case("MeshConsumerRoute", M + "mesh-consumer-route.yaml",
         host="echo-v1.gateway-conformance-mesh", client_namespace=MESH_NAMESPACE,
         backend="echo-v1", response_absent=("X-Header-Set",),
         name="request not from consumer route's namespace not modified by HTTPRoute"),
]  # fmt: skip

_FRONTEND = [
    Case("MeshFrontend", M + "mesh-frontend.yaml", host="echo-v2", backend="echo-v2",
         response_headers=(("X-Header-Set", "set"),), name="Send to service"),
    Case("MeshFrontend", M + "mesh-frontend.yaml", host=ECHO_V2_POD + ":8080",
         backend="echo-v2", response_absent=("X-Header-Set",), name="Send to pod IP"),
    # The route attaches to the Service the client dialled, not to the Host header.
    Case("MeshFrontendHostname", M + "mesh-frontend.yaml", host="echo-v2",
         headers=(("Host", "echo-v1"),), backend="echo-v2",
         response_headers=(("X-Header-Set", "set"),),
         name="Send to service with wrong hostname"),
    Case("MeshFrontendHostname", M + "mesh-frontend.yaml", host="echo-v1",
         headers=(("Host", "echo-v2"),), backend="echo-v1", response_absent=("X-Header-Set",),
         name="Send to other service with matching hostname"),
]  # fmt: skip

_PORTS = [
    Case("MeshPorts", M + "mesh-ports.yaml", host="echo-v1", backend="echo-v1",
         response_headers=(("X-Header-Set", "v1"),), name="Explicit port set, send to that port"),
    Case("MeshPorts", M + "mesh-ports.yaml", host="echo-v1:8080", backend="echo-v1",
         response_absent=("X-Header-Set",), name="Explicit port, send to an excluded port"),
    Case("MeshPorts", M + "mesh-ports.yaml", host="echo-v2", backend="echo-v2",
         response_headers=(("X-Header-Set", "v2"),), name="No port set"),
    Case("MeshPorts", M + "mesh-ports.yaml", host="echo-v2:8080", backend="echo-v2",
         response_headers=(("X-Header-Set", "v2"),), name="No port set"),
]  # fmt: skip

#: Every transcribed case, in upstream file order within each test.
CASES: tuple[Case, ...] = tuple(
    _BASIC + _SIMPLE + _SPLIT + _MATCHING + _QUERY + _NAMED + _WEIGHT + _REDIRECTS
    + _HEADER_MODIFIER + _REWRITE + _CONSUMER + _FRONTEND + _PORTS
)  # fmt: skip

#: Every upstream mesh test (ShortName) at the vendored commit, with its manifest (None:
#: base manifests only) and protocol. gRPC tests are not transcribed (HTTP only for now).
MESH_TESTS: dict[str, tuple[str | None, str]] = {
    "MeshBasic": (None, "http"),
    "MeshConsumerRoute": (M + "mesh-consumer-route.yaml", "http"),
    "MeshFrontend": (M + "mesh-frontend.yaml", "http"),
    "MeshFrontendHostname": (M + "mesh-frontend.yaml", "http"),
    "MeshPorts": (M + "mesh-ports.yaml", "http"),
    "MeshTrafficSplit": (M + "mesh-split.yaml", "http"),
    "MeshHTTPRoute303Redirect": (M + "httproute-303-redirect.yaml", "http"),
    "MeshHTTPRoute307Redirect": (M + "httproute-307-redirect.yaml", "http"),
    "MeshHTTPRoute308Redirect": (M + "httproute-308-redirect.yaml", "http"),
    "MeshHTTPRouteMatching": (M + "httproute-matching.yaml", "http"),
    "MeshHTTPRouteNamedRule": (M + "httproute-named-rule.yaml", "http"),
    "MeshHTTPRouteQueryParamMatching": (M + "httproute-query-param-matching.yaml", "http"),
    "MeshHTTPRouteRedirectHostAndStatus": (M + "httproute-redirect-host-and-status.yaml", "http"),
    "MeshHTTPRouteRedirectPath": (M + "httproute-redirect-path.yaml", "http"),
    "MeshHTTPRouteRedirectPort": (M + "httproute-redirect-port.yaml", "http"),
    "MeshHTTPRouteRedirectScheme": (M + "httproute-redirect-scheme.yaml", "http"),
    "MeshHTTPRouteRequestHeaderModifier": (M + "httproute-request-header-modifier.yaml", "http"),
    "MeshHTTPRouteBackendRequestHeaderModifier": (
        M + "httproute-request-header-modifier-backend.yaml",
        "http",
    ),
    "MeshHTTPRouteRewritePath": (M + "httproute-rewrite-path.yaml", "http"),
    "MeshHTTPRouteSimpleSameNamespace": (M + "httproute-simple-same-namespace.yaml", "http"),
    "MeshHTTPRouteWeight": (M + "httproute-weight.yaml", "http"),
    "MeshGRPCRouteRequestHeaderModifier": (M + "grpcroute-request-header-modifier.yaml", "grpc"),
    "MeshGRPCRouteWeight": (M + "grpcroute-weight.yaml", "grpc"),
}
