"""A policy kind's modules (its builder and its part of the model) load when a document of that
kind is first seen, not before.

Start-up (issue 15, item 3): a process whose policy holds only Services must not pay for the
HTTPRoute, SMI, AuthorizationPolicy and RequestAuthentication code, nor for creating those
kinds' model dataclasses. Each case runs in a fresh
interpreter, since this test process has loaded every kind already. Time is measured in
benchmarks/startup.py (docs/performance.md), never here.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable

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


def loaded_after(policy: str, modules: Iterable[str], classes: Iterable[str] = ()) -> set[str]:
    """Which of ``modules`` are in ``sys.modules`` of a fresh interpreter after ``import meshlib``
    and ``Mesh.from_text(policy)``, and which of the model ``classes`` are created by then
    (found by name in ``meshlib.config.model``, where they were all created before they moved)."""
    code = (
        "import sys, meshlib\n"
        f"meshlib.Mesh.from_text({policy!r}, service='s', namespace='default', metrics=False)\n"
        "model = vars(sys.modules['meshlib.config.model'])\n"
        f"names = [m for m in {sorted(modules)!r} if m in sys.modules]\n"
        f"names += [n for n in {sorted(classes)!r} if n in model]\n"
        "print(','.join(names))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    return set(out.split(",")) - {""}


@pytest.mark.timeout(90)
def test_a_policy_of_services_loads_no_other_kind_module() -> None:
    assert loaded_after(SERVICE, KIND_MODULES) == set()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("module", sorted(KIND_MODULES))
def test_a_document_of_a_kind_loads_its_module(module: str) -> None:
    loaded = loaded_after(SERVICE + "---\n" + KIND_MODULES[module], KIND_MODULES)
    assert module in loaded, loaded


#: Each kind's part of the model (``meshlib.config.model`` re-exports its names on first use).
KIND_MODELS = {
    "meshlib.config.httproute": "meshlib.config.routemodel",
    "meshlib.config.smi": "meshlib.config.smimodel",
    "meshlib.config.authzkind": "meshlib.config.authzmodel",
    "meshlib.config.authnkind": "meshlib.config.authnmodel",
}


#: One class of each kind's part of the model.
KIND_CLASSES = ("HTTPRoute", "HTTPRouteRule", "Split", "AuthorizationPolicy", "JwtRule")


@pytest.mark.timeout(90)
def test_a_policy_of_services_creates_no_kind_model_class() -> None:
    assert loaded_after(SERVICE, KIND_MODELS.values(), KIND_CLASSES) == set()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("module", sorted(KIND_MODULES))
def test_a_document_of_a_kind_loads_its_model(module: str) -> None:
    loaded = loaded_after(
        SERVICE + "---\n" + KIND_MODULES[module], KIND_MODELS.values(), KIND_CLASSES
    )
    assert KIND_MODELS[module] in loaded, loaded


@pytest.mark.timeout(90)
def test_every_kind_model_name_is_still_importable_from_the_model() -> None:
    """``from meshlib.config.model import HTTPRoute`` works as before the classes moved: the
    same class, loaded on that first access; an unknown name still fails as it did."""
    code = (
        "import importlib, inspect, sys\n"
        "import meshlib.config.model as model\n"
        f"mods = {sorted(KIND_MODELS.values())!r}\n"
        "assert not any(m in sys.modules for m in mods), 'loaded at import'\n"
        "from meshlib.config.model import HTTPRoute, JwtRule, Split\n"
        "count = 0\n"
        "for name in mods:\n"
        "    mod = importlib.import_module(name)\n"
        "    for n, obj in vars(mod).items():\n"
        "        if inspect.isclass(obj) and obj.__module__ == name:\n"
        "            assert getattr(model, n) is obj and n in dir(model), n\n"
        "            count += 1\n"
        "try:\n"
        "    model.NoSuchName\n"
        "except AttributeError as exc:\n"
        "    assert 'NoSuchName' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
        "print(count)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 28  # 27 dataclasses and the AuthzAction enum
