"""The ingress gateway's config file: Gateway (gateway.networking.k8s.io/v1) listeners, TLS
Secrets and CA ConfigMaps, Gateway-parented HTTPRoutes; the upstream CRD's limits and CEL rules,
what meshlib does not serve refused by name, and references checked, each problem with
file:line and field path (issue 14)."""

from __future__ import annotations

import base64
import textwrap

import pytest

from meshlib.config.gatewaykind import (
    MAX_LISTENERS,
    ClientValidation,
    GatewayConfig,
    Listener,
    ListenerProtocol,
    ListenerTLS,
    NamespacesFrom,
    ObjectRef,
    hostnames_intersect,
    load_gateway_config,
)
from meshlib.errors import ConfigError, Problem
from tests.gateway.gwcerts import Pair, TestCA

CA = TestCA.create()
SHOP = CA.leaf("shop.example.com")
WILD = CA.leaf("*.example.com")
OTHER = CA.leaf("other.example.net")


def secret(name: str, pair: Pair, *, base64_data: bool = True, namespace: str = "edge") -> str:
    if base64_data:
        crt = base64.b64encode(pair.cert_pem).decode()
        key = base64.b64encode(pair.key_pem).decode()
        body = f"data:\n  tls.crt: {crt}\n  tls.key: {key}\n"
    else:
        body = (
            "stringData:\n  tls.crt: |\n"
            + textwrap.indent(pair.cert_pem.decode(), "    ")
            + "  tls.key: |\n"
            + textwrap.indent(pair.key_pem.decode(), "    ")
        )
    return (
        f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n"
        f"type: kubernetes.io/tls\n{body}"
    )


def configmap(name: str, pem: bytes) -> str:
    return (
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: edge\n"
        "data:\n  ca.crt: |\n" + textwrap.indent(pem.decode(), "    ")
    )


GATEWAY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: edge
  namespace: edge
spec:
  gatewayClassName: meshlib
  listeners:
  - name: http
    port: 8080
    protocol: HTTP
  - name: shop
    hostname: shop.example.com
    port: 8443
    protocol: HTTPS
    tls:
      mode: Terminate
      certificateRefs:
      - {group: "", kind: Secret, name: shop-cert}
  - name: wild
    hostname: "*.example.com"
    port: 8443
    protocol: HTTPS
    tls:
      certificateRefs: [{name: wild-cert}]
    allowedRoutes:
      namespaces: {from: All}
      kinds: [{kind: HTTPRoute}]
  tls:
    frontend:
      default:
        validation:
          caCertificateRefs: [{group: "", kind: ConfigMap, name: partners}]
      perPort:
      - port: 9443
        tls:
          validation:
            caCertificateRefs: [{group: "", kind: ConfigMap, name: partners}]
"""

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: shop
  namespace: edge
spec:
  parentRefs:
  - {name: edge, sectionName: shop}
  hostnames: [shop.example.com]
  rules:
  - backendRefs: [{name: shop, namespace: shop, port: 80}]
"""


def full(*extra: str, gateway: str = GATEWAY, route: str = ROUTE) -> str:
    docs = [
        gateway,
        route,
        secret("shop-cert", SHOP),
        secret("wild-cert", WILD, base64_data=False),
        configmap("partners", CA.pem),
        *extra,
    ]
    return "---\n".join(docs)


def load(text: str) -> GatewayConfig:
    return load_gateway_config([("gw.yaml", text)])


def problems(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load(text)
    return list(info.value.problems)


def find(found: list[Problem], field: str, contains: str = "") -> Problem:
    for p in found:
        if p.field == field and contains in p.message:
            return p
    raise AssertionError(
        f"no problem at {field!r} with {contains!r} in:\n" + "\n".join(map(str, found))
    )


def line_of(text: str, needle: str, nth: int = 1) -> int:
    seen = 0
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            seen += 1
            if seen == nth:
                return number
    raise AssertionError(f"{needle!r} not found")


def test_a_full_gateway_file_loads_into_the_model() -> None:
    config = load(full())
    (gateway,) = config.gateways
    assert (gateway.name, gateway.namespace, gateway.class_name) == ("edge", "edge", "meshlib")
    http, shop, wild = gateway.listeners
    assert http == Listener("http", 8080, ListenerProtocol.HTTP)
    assert shop == Listener(
        "shop",
        8443,
        ListenerProtocol.HTTPS,
        "shop.example.com",
        ListenerTLS((ObjectRef("Secret", "shop-cert", "edge"),)),
    )
    assert wild.hostname == "*.example.com"
    assert wild.namespaces_from is NamespacesFrom.ALL
    assert wild.kinds == (("gateway.networking.k8s.io", "HTTPRoute"),)
    partners = ClientValidation((ObjectRef("ConfigMap", "partners", "edge"),))
    assert gateway.client_validation == partners
    assert gateway.validation_for(9443) == partners and gateway.validation_for(8443) == partners
    assert config.secrets["edge", "shop-cert"].cert_pem == SHOP.cert_pem
    assert config.secrets["edge", "wild-cert"].key_pem == WILD.key_pem  # stringData form
    assert config.configmaps["edge", "partners"].ca_pem == CA.pem
    (route,) = config.http_routes
    assert route.name == "shop" and route.parent_refs[0].section_name == "shop"
    assert config.routes_of(gateway) == (route,)


def test_the_defaults_of_a_minimal_listener() -> None:
    text = GATEWAY.split("  - name: shop")[0]
    (gateway,) = load(text).gateways
    (listener,) = gateway.listeners
    assert listener.namespaces_from is NamespacesFrom.SAME and listener.kinds == ()
    assert listener.hostname is None and listener.tls is None
    assert gateway.client_validation is None and gateway.validation_for(8080) is None


@pytest.mark.parametrize("protocol", ["TLS", "TCP", "UDP", "example.com/quic"])
def test_other_protocols_are_refused_as_not_supported(protocol: str) -> None:
    text = full(gateway=GATEWAY.replace("protocol: HTTP\n", f"protocol: {protocol}\n", 1))
    p = find(problems(text), "spec.listeners[0].protocol", "not supported")
    assert f"'{protocol}'" in p.message and "use HTTP or HTTPS" in p.message
    assert (p.file, p.line) == ("gw.yaml", line_of(text, f"protocol: {protocol}"))


def test_passthrough_is_refused_as_not_supported() -> None:
    text = full(gateway=GATEWAY.replace("mode: Terminate", "mode: Passthrough"))
    p = find(problems(text), "spec.listeners[1].tls.mode", "Passthrough is not supported")
    assert p.line == line_of(text, "mode: Passthrough")


def test_a_selector_for_route_namespaces_is_refused_as_not_supported() -> None:
    text = full(gateway=GATEWAY.replace("{from: All}", "{from: Selector, selector: {}}"))
    p = find(problems(text), "spec.listeners[2].allowedRoutes.namespaces.from", "Selector")
    assert "not supported" in p.message


def test_a_route_kind_other_than_httproute_is_refused() -> None:
    text = full(gateway=GATEWAY.replace("[{kind: HTTPRoute}]", "[{kind: GRPCRoute}]"))
    p = find(problems(text), "spec.listeners[2].allowedRoutes.kinds[0]", "GRPCRoute")
    assert "not supported" in p.message


def test_listener_names_must_be_unique() -> None:
    text = full(gateway=GATEWAY.replace("- name: wild", "- name: shop"))
    p = find(problems(text), "spec.listeners[2].name", "must be unique")
    assert "spec.listeners[1]" in p.message and p.line == line_of(text, "- name: shop", 2)


def test_port_protocol_and_hostname_must_be_unique() -> None:
    text = full(gateway=GATEWAY.replace('"*.example.com"', "shop.example.com"))
    p = find(problems(text), "spec.listeners[2]", "must be unique")
    assert "spec.listeners[1]" in p.message


def test_http_and_https_cannot_share_a_port() -> None:
    text = full(gateway=GATEWAY.replace("port: 8080", "port: 8443"))
    p = find(problems(text), "spec.listeners[1].protocol", "one port serves one protocol")
    assert "port 8443 is HTTP" in p.message


def test_at_most_64_listeners() -> None:
    listeners = "".join(
        f"  - {{name: l{i}, port: {1000 + i}, protocol: HTTP}}\n" for i in range(MAX_LISTENERS + 1)
    )
    text = GATEWAY.split("  listeners:\n")[0] + "  listeners:\n" + listeners
    p = find(problems(text), "spec.listeners", "at most 64")
    assert "65 items" in p.message
    fine = GATEWAY.split("  listeners:\n")[0] + "  listeners:\n" + listeners.rsplit("  - ", 1)[0]
    assert len(load(fine).gateways[0].listeners) == MAX_LISTENERS


def test_https_needs_tls_with_a_certificate_ref() -> None:
    no_tls = GATEWAY.replace(
        "    tls:\n      mode: Terminate\n      certificateRefs:\n"
        '      - {group: "", kind: Secret, name: shop-cert}\n',
        "",
    )
    find(problems(full(gateway=no_tls)), "spec.listeners[1].tls", "needs tls")
    empty = GATEWAY.replace("certificateRefs: [{name: wild-cert}]", "certificateRefs: []")
    find(problems(full(gateway=empty)), "spec.listeners[2].tls.certificateRefs", "at least one")


def test_http_must_not_have_tls() -> None:
    text = full(
        gateway=GATEWAY.replace(
            "protocol: HTTP\n",
            "protocol: HTTP\n    tls: {certificateRefs: [{name: shop-cert}]}\n",
            1,
        )
    )
    p = find(problems(text), "spec.listeners[0].tls", "must not have tls")
    assert p.line == line_of(text, "tls: {certificateRefs")


def test_tls_options_are_refused_rather_than_ignored() -> None:
    text = full(
        gateway=GATEWAY.replace(
            "certificateRefs: [{name: wild-cert}]",
            "certificateRefs: [{name: wild-cert}]\n      options: {example.com/min-version: '1.3'}",
        )
    )
    p = find(problems(text), "spec.listeners[2].tls.options.example.com/min-version")
    assert "not supported" in p.message


def test_a_certificate_ref_must_be_a_core_secret_in_the_gateway_namespace() -> None:
    kind = full(
        gateway=GATEWAY.replace(
            "kind: Secret, name: shop-cert", "kind: Certificate, name: shop-cert"
        )
    )
    find(problems(kind), "spec.listeners[1].tls.certificateRefs[0].kind", "not supported")
    other_ns = full(
        gateway=GATEWAY.replace("{name: wild-cert}", "{name: wild-cert, namespace: certs}")
    )
    p = find(problems(other_ns), "spec.listeners[2].tls.certificateRefs[0].namespace")
    assert "ReferenceGrant" in p.message


def test_a_certificate_ref_must_name_a_secret_in_the_file() -> None:
    text = full(gateway=GATEWAY.replace("name: shop-cert", "name: shop-crt"))
    p = find(problems(text), "spec.listeners[1].tls.certificateRefs[0].name", "no Secret")
    assert "edge/shop-crt" in p.message and p.line == line_of(text, "name: shop-crt")


def test_a_secret_whose_key_does_not_match_its_certificate_is_refused() -> None:
    mixed = Pair(SHOP.cert_pem, OTHER.key_pem)
    text = full().replace(secret("shop-cert", SHOP), secret("shop-cert", mixed))
    p = find(problems(text), "data.tls.key", "does not match")
    assert "CN=shop.example.com" in p.message
    assert OTHER.key_pem.decode().splitlines()[1] not in str(p)  # the key is never quoted


def test_secret_contents_are_checked() -> None:
    bad_pem = secret("shop-cert", Pair(b"not a certificate", SHOP.key_pem))
    text = full().replace(secret("shop-cert", SHOP), bad_pem)
    find(problems(text), "data.tls.crt", "not a PEM certificate")
    bad_b64 = full().replace(
        secret("shop-cert", SHOP), secret("shop-cert", SHOP).replace("tls.crt: ", "tls.crt: x")
    )
    find(problems(bad_b64), "data.tls.crt", "not valid base64")
    opaque = full().replace("type: kubernetes.io/tls", "type: Opaque", 1)
    find(problems(opaque), "type", "kubernetes.io/tls")
    missing = full(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: empty, namespace: edge}\n"
        "type: kubernetes.io/tls\nstringData: {tls.crt: x}\n"
    )
    find(problems(missing), "data", "needs tls.key")


def test_client_validation_needs_a_configmap_with_ca_crt() -> None:
    text = full().replace(
        "kind: ConfigMap, name: partners}]\n      perPort",
        "kind: ConfigMap, name: partner}]\n      perPort",
    )
    p = find(
        problems(text),
        "spec.tls.frontend.default.validation.caCertificateRefs[0].name",
        "no ConfigMap edge/partner",
    )
    assert p.line == line_of(text, "name: partner}")
    empty = full().replace(
        configmap("partners", CA.pem),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: partners, namespace: edge}\n"
        "data: {other: x}\n",
    )
    find(
        problems(empty),
        "spec.tls.frontend.default.validation.caCertificateRefs[0].name",
        "has no ca.crt",
    )


def test_insecure_fallback_is_refused() -> None:
    text = full(
        gateway=GATEWAY.replace(
            'caCertificateRefs: [{group: "", kind: ConfigMap, name: partners}]\n      perPort',
            'caCertificateRefs: [{group: "", kind: ConfigMap, name: partners}]\n'
            "          mode: AllowInsecureFallback\n      perPort",
        )
    )
    find(problems(text), "spec.tls.frontend.default.validation.mode", "AllowInsecureFallback")


def test_upstream_fields_meshlib_does_not_serve_are_named() -> None:
    text = full(
        gateway=GATEWAY.replace(
            "  gatewayClassName: meshlib\n",
            "  gatewayClassName: meshlib\n  addresses: [{value: 10.0.0.1}]\n",
        )
    )
    p = find(problems(text), "spec.addresses", "not supported")
    assert "--listen" in p.message


def test_unknown_fields_are_refused_with_a_hint() -> None:
    text = full(gateway=GATEWAY.replace("    protocol: HTTP\n", "    protocl: HTTP\n", 1))
    found = problems(text)
    find(found, "spec.listeners[0].protocl", "did you mean 'protocol'")
    find(found, "spec.listeners[0].protocol", "missing required field")


def test_a_route_parent_must_be_a_gateway_in_the_file() -> None:
    text = full(route=ROUTE.replace("{name: edge, sectionName: shop}", "{name: edges}"))
    p = find(problems(text), "spec.parentRefs[0].name", "no Gateway edge/edges")
    assert p.line == line_of(text, "{name: edges}")
    mesh = full(
        route=ROUTE.replace(
            "{name: edge, sectionName: shop}", "{group: '', kind: Service, name: shop, port: 80}"
        )
    )
    find(problems(mesh), "spec.parentRefs[0]", "belongs in the mesh policy")


def test_a_section_name_must_name_a_listener() -> None:
    text = full(route=ROUTE.replace("sectionName: shop", "sectionName: shops"))
    p = find(problems(text), "spec.parentRefs[0].sectionName", "no listener 'shops'")
    assert "http, shop, wild" in p.message


def test_a_parent_port_must_be_a_listener_port() -> None:
    text = full(route=ROUTE.replace("sectionName: shop}", "sectionName: shop, port: 9000}"))
    find(problems(text), "spec.parentRefs[0].port", "on port 9000")
    assert load(full(route=ROUTE.replace("sectionName: shop}", "port: 8443}"))).http_routes


def test_allowed_routes_namespaces_are_enforced() -> None:
    other = ROUTE.replace("namespace: edge", "namespace: shop").replace(
        "{name: edge, sectionName: shop}", "{name: edge, namespace: edge, sectionName: shop}"
    )
    find(problems(full(route=other)), "spec.parentRefs[0]", "allows routes from namespace 'shop'")
    # the wildcard listener allows All namespaces
    assert load(full(route=other.replace("sectionName: shop", "sectionName: wild"))).http_routes


def test_route_errors_come_from_the_httproute_builder() -> None:
    text = full(route=ROUTE.replace("port: 80}", "weight: 5}"))
    find(problems(text), "spec.rules[0].backendRefs[0].port", "needs port")


def test_kinds_of_the_mesh_policy_are_not_read_here() -> None:
    text = full("apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: x}\nspec: {}\n")
    p = find(problems(text), "kind", "not read here")
    assert "Gateway, HTTPRoute, Secret, ConfigMap" in p.message


def test_duplicates_and_every_problem_of_every_file_are_listed() -> None:
    twice = full(secret("shop-cert", SHOP))
    find(problems(twice), "metadata.name", "declared twice")
    with pytest.raises(ConfigError) as info:
        load_gateway_config(
            [
                ("a.yaml", full(gateway=GATEWAY.replace("protocol: HTTP\n", "protocol: TCP\n", 1))),
                ("b.yaml", "kind: Gateway\n"),
            ]
        )
    files = {p.file for p in info.value.problems}
    assert files == {"a.yaml", "b.yaml"}
    assert "a.yaml:" in str(info.value) and "b.yaml:" in str(info.value)


def test_route_hostnames_must_intersect_a_listener_hostname() -> None:
    assert hostnames_intersect("*.example.com", "foo.test.example.com")
    assert hostnames_intersect("test.example.com", "*.example.com")
    assert hostnames_intersect("*.example.com", "*.a.example.com")
    assert not hostnames_intersect("*.example.com", "example.com")
    assert not hostnames_intersect("test.example.com", "test.example.net")
    text = full(route=ROUTE.replace("[shop.example.com]", "[shop.example.net]"))
    p = find(problems(text), "spec.hostnames", "intersects")
    assert "shop.example.com" in p.message and p.line == line_of(text, "hostnames:")
    # the wildcard listener (all namespaces) takes a deeper name
    deep = ROUTE.replace("[shop.example.com]", "[a.b.example.com]").replace(
        "sectionName: shop", "sectionName: wild"
    )
    assert load(full(route=deep)).http_routes
    # a listener without hostname takes any route hostname
    http = ROUTE.replace("[shop.example.com]", "[anything.example.org]").replace(
        "sectionName: shop", "sectionName: http"
    )
    assert load(full(route=http)).http_routes


def test_a_text_the_policy_loader_would_refuse_is_refused_the_same_way() -> None:
    # The gateway config is read as the mesh policy is (loader.source_documents): a lone
    # surrogate, which UTF-8 cannot hold, is named with its line, and a file over the cap and an
    # empty one are refused by name; the other file's problems are still listed.
    broken = full().replace("name: shop-cert", "name: shop-\udcffcert", 1)
    with pytest.raises(ConfigError) as info:
        load_gateway_config(
            [("a.yaml", broken), ("b.yaml", "# nothing\n"), ("c.yaml", "#" * (8 * 1024 * 1024 + 1))]
        )
    found = {p.file: p for p in info.value.problems}
    assert "lone surrogate" in found["a.yaml"].message
    assert found["a.yaml"].line == line_of(broken, "shop-\udcffcert")
    assert "no documents" in found["b.yaml"].message
    assert "larger than the 8388608-byte limit" in found["c.yaml"].message
