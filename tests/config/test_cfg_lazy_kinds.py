"""A policy kind's module loads when a document of that kind is first seen, not before.

Start-up (issue 15, item 3): a process whose policy holds only Services must not pay for the
HTTPRoute, SMI, AuthorizationPolicy and RequestAuthentication code. Each case runs in a fresh
interpreter, since this test process has loaded every kind already. Time is measured in
benchmarks/startup.py (docs/performance.md), never here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

#: The modules that only a document of their kind needs, and one such document each.
KIND_MODULES = {
    "meshlib.config.httproute": """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{group: "", kind: Service, name: backend}]
  rules: [{backendRefs: [{name: backend, port: 9}]}]
""",
    "meshlib.config.smi": """\
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: s}
spec:
  service: backend
  backends: [{service: backend-v1, weight: 1}]
""",
    "meshlib.config.authzkind": """\
apiVersion: meshlib/v1
kind: AuthorizationPolicy
metadata: {name: a}
spec: {action: ALLOW, rules: [{}]}
""",
    "meshlib.config.authnkind": """\
apiVersion: meshlib/v1
kind: RequestAuthentication
metadata: {name: j}
spec: {jwtRules: [{issuer: "https://issuer.example", jwksUri: "https://issuer.example/jwks"}]}
""",
}

SERVICE = """\
apiVersion: meshlib/v1
kind: Service
metadata: {name: backend, namespace: default}
spec:
  endpoints:
  - address: 127.0.0.1:9
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: backend-v1, namespace: default}
spec:
  endpoints:
  - address: 127.0.0.1:9
"""


def loaded_after(policy: str) -> set[str]:
    """The kind modules in ``sys.modules`` of a fresh interpreter after ``import meshlib`` and
    ``Mesh.from_text(policy)``."""
    code = (
        "import sys, meshlib\n"
        f"meshlib.Mesh.from_text({policy!r}, service='s', namespace='default', metrics=False)\n"
        f"print(','.join(m for m in {sorted(KIND_MODULES)!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    return set(out.split(",")) - {""}


@pytest.mark.timeout(90)
def test_a_policy_of_services_loads_no_other_kind_module() -> None:
    assert loaded_after(SERVICE) == set()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("module", sorted(KIND_MODULES))
def test_a_document_of_a_kind_loads_its_module(module: str) -> None:
    loaded = loaded_after(SERVICE + "---\n" + KIND_MODULES[module])
    assert module in loaded, loaded
