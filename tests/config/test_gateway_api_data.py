"""The vendored Gateway API mesh conformance files are intact, and the transcribed table fits them.

The files under tests/data/gateway-api are upstream's, unchanged (see its README): these tests
pin their digests and counts so an accidental edit or loss fails here, check that each parses
as YAML documents naming the Gateway API version upstream uses, and check that every case of
the transcribed table (tests/config/gateway_conformance.py) points at a vendored manifest and
at a backend that manifest can route to.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from gateway_conformance import CASES, DATA_DIR, MESH_TESTS, WEIGHTS

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / DATA_DIR
MESH_TESTS_DIR = "conformance/tests/mesh"
BASE = "conformance/mesh/manifests.yaml"
GATEWAY_API_V1 = "gateway.networking.k8s.io/v1"

#: sha256 of every vendored file (upstream commit 4564255a). Refreshing from upstream means
#: copying the files again unchanged and updating these digests and the counts below.
DIGESTS = {
    "LICENSE": ("20b6dde626f521dbb384f75e6d96c3d16789df3bf878b58bc2810614fb4db07c"),
    "conformance/mesh/manifests.yaml": (
        "4ade870abee6cc31d35d7b5dbc6544c2fdc6851141d353ab9c23eb0352a5f301"
    ),
    "conformance/tests/mesh/grpcroute-request-header-modifier.yaml": (
        "a7f0ba32e5a30b4a10a26920ef244de05be2f4218502ca409591e6692d97ca3e"
    ),
    "conformance/tests/mesh/grpcroute-weight.yaml": (
        "a477e1fe671932de38c8c8bf87c112a6b60accad82cd612ce2f50aeac5d9af50"
    ),
    "conformance/tests/mesh/httproute-303-redirect.yaml": (
        "21be7df98042c28efd6206c2d808ec12c2a05b20bca1e71dadd4e53d0aed431b"
    ),
    "conformance/tests/mesh/httproute-307-redirect.yaml": (
        "db3913ba786dbda9edc54bd1014e27d04af731c98503bdb8294e35e54dfafae6"
    ),
    "conformance/tests/mesh/httproute-308-redirect.yaml": (
        "86a8952055d4e368decd4bc8eed2e8f14b5c82de31316fe9155c88bc090931e5"
    ),
    "conformance/tests/mesh/httproute-matching.yaml": (
        "790abcb237e642973f1d116938f801f8006e7f9ce47930f827cf65c7d45fe242"
    ),
    "conformance/tests/mesh/httproute-named-rule.yaml": (
        "70db69a57cd27a72ce7d2b64a04c74f962eb3d1d01290f38ebe781e2baf00a61"
    ),
    "conformance/tests/mesh/httproute-query-param-matching.yaml": (
        "a3522f9ceaa92585c7f7d89d590a481f023cf42084bec58ecd7ac7779ac14f1e"
    ),
    "conformance/tests/mesh/httproute-redirect-host-and-status.yaml": (
        "55ebd18296ba12aca8f88580f494cb633804e646c73c59b9d489e16fcdba3cb3"
    ),
    "conformance/tests/mesh/httproute-redirect-path.yaml": (
        "873d441ad78137e25e3a11ad06a7eb2376c1b80503a86a061c2aa6f2a82b62e0"
    ),
    "conformance/tests/mesh/httproute-redirect-port.yaml": (
        "44c0aba3fa9e4ef4012f82235e4f5f13459cbe4d1f650c3fa7d2cf18eb136d6e"
    ),
    "conformance/tests/mesh/httproute-redirect-scheme.yaml": (
        "e4d1d1f54884377a420650b592b900ccca6bbceece56a5b2cb881ae789db2d0c"
    ),
    "conformance/tests/mesh/httproute-request-header-modifier-backend.yaml": (
        "a45e39e4501d08a4adf337614307e2fad645d83fa4c838d5970fbe5a4b609cf2"
    ),
    "conformance/tests/mesh/httproute-request-header-modifier.yaml": (
        "702d9f34daace019f14583a61113a9acd57bb8f18d2129c2fa805216e28daf05"
    ),
    "conformance/tests/mesh/httproute-rewrite-path.yaml": (
        "823f626cadb53bcf2ad103860b504769283d8d539f5f93685a790326e1440505"
    ),
    "conformance/tests/mesh/httproute-simple-same-namespace.yaml": (
        "c3b7c357f6cc1efb1c4bd0fad0c45efff9647a06d78ebff2e41270c25b22069d"
    ),
    "conformance/tests/mesh/httproute-weight.yaml": (
        "39a232d7e0a412b254169201a65329a9fe83b96bb8af3141abe391d79ab85473"
    ),
    "conformance/tests/mesh/mesh-consumer-route.yaml": (
        "74b734d1dc5df26f9c3af8f10d01d5d1295f8316ffde69f170370250d2251a8b"
    ),
    "conformance/tests/mesh/mesh-frontend.yaml": (
        "5ac3abee2bb60df2aa8fc65509587583af48b5cdf68078c67384456125152f55"
    ),
    "conformance/tests/mesh/mesh-ports.yaml": (
        "a51636a6e54b6bb29f842018c67aefd885f69cef123e96480a39e64ad4f7164d"
    ),
    "conformance/tests/mesh/mesh-split.yaml": (
        "40b38485d2feca536f773cb6ffbfb0033a88f970d9ac72543722be101eb78806"
    ),
}
N_MESH_TEST_FILES = 21
N_HTTPROUTE_DOCS = 20
N_GRPCROUTE_DOCS = 2
BASE_KINDS = {"Namespace": 2, "Deployment": 3, "Service": 3}
#: Upstream mesh tests at the vendored commit: 21 HTTP ones (all transcribed) + 2 gRPC ones.
N_MESH_TESTS = 23
N_CASES = 80
#: Cases per upstream test, as counted in its .go file (the header-modifier table serves two).
CASES_PER_TEST = {
    "MeshBasic": 1,
    "MeshHTTPRouteSimpleSameNamespace": 1,
    "MeshTrafficSplit": 2,
    "MeshHTTPRouteMatching": 9,
    "MeshHTTPRouteQueryParamMatching": 15,
    "MeshHTTPRouteNamedRule": 2,
    "MeshHTTPRouteWeight": 1,
    "MeshHTTPRoute303Redirect": 1,
    "MeshHTTPRoute307Redirect": 1,
    "MeshHTTPRoute308Redirect": 1,
    "MeshHTTPRouteRedirectHostAndStatus": 2,
    "MeshHTTPRouteRedirectPath": 6,
    "MeshHTTPRouteRedirectPort": 4,
    "MeshHTTPRouteRedirectScheme": 4,
    "MeshHTTPRouteRequestHeaderModifier": 7,
    "MeshHTTPRouteBackendRequestHeaderModifier": 7,
    "MeshHTTPRouteRewritePath": 6,
    "MeshConsumerRoute": 2,
    "MeshFrontend": 2,
    "MeshFrontendHostname": 2,
    "MeshPorts": 4,
}


def vendored_yaml() -> list[Path]:
    return sorted(DATA.rglob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    for d in docs:
        assert isinstance(d, dict), f"{path}: a document is {type(d).__name__}, not a mapping"
    return docs


def routes_in(rel: str) -> list[dict[str, Any]]:
    return [d for d in documents(DATA / rel) if d["kind"] in ("HTTPRoute", "GRPCRoute")]


def test_every_vendored_file_is_present_and_unchanged() -> None:
    present = {
        p.relative_to(DATA).as_posix()
        for p in DATA.rglob("*")
        if p.is_file() and p.name != "README.md"
    }
    assert present == set(DIGESTS), f"files lost or added under {DATA_DIR}"
    for rel, digest in DIGESTS.items():
        got = hashlib.sha256((DATA / rel).read_bytes()).hexdigest()
        assert got == digest, f"{DATA_DIR}/{rel} differs from the vendored upstream file"


def test_licence_is_apache_2_and_readme_names_upstream() -> None:
    assert "Apache License" in (DATA / "LICENSE").read_text(encoding="utf-8")
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert "https://github.com/kubernetes-sigs/gateway-api" in readme
    assert "4564255ac2c35d582249b3cdf261bdf51c8bca32" in readme


@pytest.mark.parametrize("path", vendored_yaml(), ids=lambda p: p.name)
def test_vendored_yaml_parses_into_kubernetes_documents(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path}: no documents"
    for d in docs:
        assert isinstance(d.get("apiVersion"), str) and isinstance(d.get("kind"), str), path
        assert d["metadata"]["name"], path
        if d["kind"] in ("HTTPRoute", "GRPCRoute"):
            # Upstream's mesh tests use the standard (v1) channel for both route kinds.
            assert d["apiVersion"] == GATEWAY_API_V1, f"{path}: {d['apiVersion']}"


def test_counts_of_mesh_test_files_and_routes_are_pinned() -> None:
    files = sorted((DATA / MESH_TESTS_DIR).glob("*.yaml"))
    assert len(files) == N_MESH_TEST_FILES
    kinds = Counter(d["kind"] for f in files for d in documents(f))
    assert kinds == {"HTTPRoute": N_HTTPROUTE_DOCS, "GRPCRoute": N_GRPCROUTE_DOCS}
    assert Counter(d["kind"] for d in documents(DATA / BASE)) == BASE_KINDS


def test_every_mesh_manifest_belongs_to_an_upstream_test() -> None:
    used = {m for m, _ in MESH_TESTS.values() if m is not None}
    files = {f"{MESH_TESTS_DIR}/{p.name}" for p in (DATA / MESH_TESTS_DIR).glob("*.yaml")}
    assert used == files
    assert len(MESH_TESTS) == N_MESH_TESTS


def test_table_covers_every_http_test_and_only_known_ones() -> None:
    http = {name for name, (_, proto) in MESH_TESTS.items() if proto == "http"}
    assert {c.test for c in CASES} == http
    assert len(CASES) == N_CASES
    assert Counter(c.test for c in CASES) == CASES_PER_TEST
    assert set(WEIGHTS) <= http


def test_each_case_uses_its_tests_manifest() -> None:
    for case in CASES:
        assert case.manifest == MESH_TESTS[case.test][0], case


def test_each_expected_backend_is_a_service_its_route_can_reach() -> None:
    services = {d["metadata"]["name"] for d in documents(DATA / BASE) if d["kind"] == "Service"}
    for case in CASES:
        if case.backend is None:
            continue
        assert case.backend in services, case
        assert case.manifest is not None, case
        refs = {
            ref["name"]
            for route in routes_in(case.manifest)
            for rule in route["spec"]["rules"]
            for ref in rule.get("backendRefs", [])
        }
        # A request a route does not take still reaches the Service it dialled.
        dialled = case.host.split(".")[0].split(":")[0]
        assert case.backend in refs | {dialled}, case


def test_redirect_and_error_cases_are_answered_by_the_mesh_not_a_backend() -> None:
    for case in CASES:
        if case.redirect is not None:
            assert case.status in (301, 302, 303, 307, 308) and case.backend is None, case
        if case.status >= 400:
            assert case.backend is None, case


def test_weights_sum_to_one_and_name_the_routes_backends() -> None:
    for test, shares in WEIGHTS.items():
        assert sum(shares.values()) == pytest.approx(1.0)
        manifest = MESH_TESTS[test][0]
        assert manifest is not None
        weighted = {
            ref["name"]: ref["weight"]
            for route in routes_in(manifest)
            for rule in route["spec"]["rules"]
            for ref in rule["backendRefs"]
        }
        total = sum(weighted.values())
        assert {k: w / total for k, w in weighted.items() if w} == pytest.approx(shares)
