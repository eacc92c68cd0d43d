"""The public surface of meshlib: exported names, the exception tree, and import cost."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

import meshlib

EXPECTED = {
    "DECISION_EXTENSION",
    "REASON_HEADER",
    "AccessDeniedError",
    "AsyncMeshTransport",
    "AttemptRecord",
    "CircuitOpenError",
    "ConfigError",
    "ConnectionPoolOverflowError",
    "Decision",
    "FaultHandle",
    "Mesh",
    "MeshError",
    "MeshMiddleware",
    "MeshTimeout",
    "MeshTransport",
    "MetricsServer",
    "NoHealthyEndpointsError",
    "Problem",
    "RateLimitedError",
    "Reason",
    "ReloadStatus",
    "RetryBudgetExhaustedError",
    "__version__",
    "metrics_app",
    "registry_app",
    "serve",
    "start_metrics_server",
}

#: Each mesh error, the httpx exception it must be caught by, its status and its reason.
ERRORS = [
    (meshlib.MeshTimeout, httpx.TimeoutException, 504, "timeout"),
    (meshlib.CircuitOpenError, httpx.TransportError, 503, "circuit_open"),
    (meshlib.NoHealthyEndpointsError, httpx.ConnectError, 503, "no_healthy_endpoints"),
    (meshlib.RetryBudgetExhaustedError, httpx.TransportError, 503, "retry_budget_exhausted"),
    (meshlib.RateLimitedError, httpx.TransportError, 429, "rate_limited"),
    (meshlib.ConnectionPoolOverflowError, httpx.PoolTimeout, 503, "overflow"),
    (meshlib.AccessDeniedError, httpx.TransportError, 403, "denied"),
]


def test_all_is_exactly_the_public_names() -> None:
    assert set(meshlib.__all__) == EXPECTED
    assert len(meshlib.__all__) == len(EXPECTED)  # no duplicates


def test_every_exported_name_is_importable() -> None:
    for name in meshlib.__all__:
        assert getattr(meshlib, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from meshlib import *", namespace)
    assert set(namespace) - {"__builtins__"} == EXPECTED


def test_version_is_a_string() -> None:
    assert isinstance(meshlib.__version__, str) and meshlib.__version__.count(".") >= 1


@pytest.mark.parametrize(("cls", "base", "status", "reason"), ERRORS)
def test_mesh_errors_subclass_the_matching_httpx_error(
    cls: type[meshlib.MeshError], base: type[Exception], status: int, reason: str
) -> None:
    assert issubclass(cls, meshlib.MeshError)
    assert issubclass(cls, base)
    assert issubclass(cls, httpx.TransportError)  # caught by `except httpx.TransportError`
    assert cls.status == status
    assert cls.reason is meshlib.Reason(reason) and cls.reason.value == reason


@pytest.mark.parametrize(("cls", "base", "status", "reason"), ERRORS)
def test_mesh_errors_carry_decision_and_request(
    cls: type[meshlib.MeshError], base: type[Exception], status: int, reason: str
) -> None:
    decision = meshlib.Decision("reviews.default", 1)
    request = httpx.Request("GET", "http://reviews/")
    error = cls("boom", decision=decision, request=request)
    assert error.decision is decision
    assert error.request is request  # type: ignore[attr-defined]
    assert str(error) == "boom"
    with pytest.raises(base):
        raise error


def test_config_error_is_not_a_mesh_error() -> None:
    assert issubclass(meshlib.ConfigError, ValueError)
    assert not issubclass(meshlib.ConfigError, meshlib.MeshError)
    problem = meshlib.Problem(file="m.yaml", line=3, document=2, field="spec.x", message="bad")
    error = meshlib.ConfigError([problem])
    assert error.problems == (problem,)
    assert "m.yaml:3" in str(error) and "spec.x" in str(error)


def test_reason_header_and_decision_extension_names() -> None:
    assert meshlib.REASON_HEADER == "x-mesh-reason"
    assert meshlib.DECISION_EXTENSION == "mesh_decision"


def test_decision_as_dict_round_trips_attempts() -> None:
    decision = meshlib.Decision("reviews.default", 3, route="r")
    decision.attempts.append(meshlib.AttemptRecord(1, "10.0.0.1:80", "status", status=503))
    data = decision.as_dict()
    assert data["service"] == "reviews.default" and data["route"] == "r"
    assert data["attempts"][0]["status"] == 503 and data["budget"] == "ok"


#: Heavy modules that `import meshlib` must not load: they arrive on first use (loading a
#: policy, the first async call, the first metric). Import *time* is measured, not asserted,
#: in benchmarks/ (docs/performance.md); this test keeps the cause of a regression visible.
LAZY_MODULES = (
    "yaml",
    "re2",
    "anyio",
    "asyncio",
    "tenacity",
    "prometheus_client",
    "jsonschema",
    "cryptography",
    "jwt",
    "opentelemetry",
    "wsproto",  # the gateway's WebSocket pass-through only
    "decimal",  # durations and weights, when a policy is loaded
    "difflib",  # "did you mean" hints: a rejected file, a failed name lookup
)

#: Modules that loading a plain policy (one service, no duration, weight or pattern) must not
#: load either: what only a rejected file, a regex, a quantity or an SDK tracer needs, and
#: OpenTelemetry, which nothing needs until something in the process imports it (issue 15).
LAZY_AFTER_PLAIN_POLICY = (
    "re2",
    "decimal",
    "difflib",
    "prometheus_client",
    "importlib.metadata",
    "opentelemetry",
)

PLAIN_POLICY = """\
apiVersion: meshlib/v1
kind: Service
metadata: {name: backend, namespace: default}
spec:
  endpoints:
  - address: 127.0.0.1:9
"""


def test_import_loads_no_heavy_modules() -> None:
    code = f"import sys, meshlib; print(','.join(m for m in {LAZY_MODULES!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"import meshlib loaded: {out}"


def test_a_plain_policy_loads_no_pattern_quantity_or_hint_modules() -> None:
    code = (
        "import sys, meshlib\n"
        f"meshlib.Mesh.from_text({PLAIN_POLICY!r}, service='s', namespace='default', "
        "metrics=False)\n"
        f"print(','.join(m for m in {LAZY_AFTER_PLAIN_POLICY!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"Mesh.from_text of one plain service loaded: {out}"


#: The inbound side and the metrics endpoint: a process that only calls out never needs them,
#: and `meshlib.MeshMiddleware`, `meshlib.serve` and the metrics names load them on first use.
LAZY_INBOUND = (
    "meshlib.inbound.middleware",
    "meshlib.inbound.serving",
    "meshlib.policy.authz",
    "meshlib.observe.exporter",
)


def test_an_outbound_mesh_loads_no_inbound_module_until_asked_for() -> None:
    code = (
        "import sys, meshlib\n"
        f"meshlib.Mesh.from_text({PLAIN_POLICY!r}, service='s', namespace='default', "
        "metrics=False)\n"
        f"print(','.join(m for m in {LAZY_INBOUND!r} if m in sys.modules))\n"
        "from meshlib import MeshMiddleware, metrics_app, serve\n"
        "from meshlib.inbound.middleware import MeshMiddleware as Middleware\n"
        "from meshlib.inbound.serving import serve as serving\n"
        "assert MeshMiddleware is Middleware and meshlib.MeshMiddleware is Middleware\n"
        "assert serve is serving and callable(metrics_app)\n"
        f"print(','.join(m for m in {LAZY_INBOUND!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "", f"import meshlib and an outbound Mesh loaded: {out[0]}"
    assert out[1].split(",") == list(LAZY_INBOUND), out[1]


def test_dir_lists_every_public_name_before_its_module_loads() -> None:
    # completion and help() read dir(): the names loaded on first use are there before it
    code = (
        "import sys, meshlib\n"
        "print(','.join(sorted(set(meshlib.__all__) - set(dir(meshlib)))))\n"
        f"print(','.join(m for m in {LAZY_INBOUND!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "", f"missing from dir(meshlib): {out[0]}"
    assert out[1] == "", f"dir(meshlib) loaded: {out[1]}"


#: The model classes of the HTTPRoute, SMI, AuthorizationPolicy and RequestAuthentication kinds:
#: creating their dataclasses was a third of `import meshlib`'s own model (issue 15).
LAZY_KIND_MODELS = (
    "meshlib.config.routemodel",
    "meshlib.config.smimodel",
    "meshlib.config.authzmodel",
    "meshlib.config.authnmodel",
)


@pytest.mark.timeout(60)
def test_a_first_call_with_default_options_loads_no_opentelemetry(echo_factory) -> None:
    """Metrics on, tracing left to OpenTelemetry's global provider: with no SDK set up and no
    trace context, the first Mesh and its first call need nothing from OpenTelemetry, nor any
    policy kind's model classes."""
    backend = echo_factory("backend")
    policy = PLAIN_POLICY.replace("127.0.0.1:9", f"127.0.0.1:{backend.port}")
    lazy = tuple(m for m in LAZY_AFTER_PLAIN_POLICY if m != "prometheus_client")  # metrics on
    lazy += LAZY_KIND_MODELS
    code = (
        "import sys, meshlib\n"
        f"mesh = meshlib.Mesh.from_text({policy!r}, service='s', namespace='default')\n"
        "with mesh.client() as client:\n"
        "    assert client.get('http://backend/').status_code == 200\n"
        f"print(','.join(m for m in {lazy!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=50
    ).stdout.strip()
    assert out == "", f"the first Mesh and call loaded: {out}"
