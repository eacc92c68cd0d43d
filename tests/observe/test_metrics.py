"""The per-call metrics collector: names, labels, cumulative buckets, bounded series."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from meshlib.decision import AttemptRecord
from meshlib.observe import metrics as metrics_module
from meshlib.observe.metrics import MeshMetrics


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_calls_are_counted_with_golden_names_and_labels(registry: CollectorRegistry) -> None:
    m = MeshMetrics.for_registry(registry)
    m.observe_call("web.default", "reviews.default", "get-reviews", "200", "ok", 0.003)
    m.observe_call("web.default", "reviews.default", "get-reviews", "200", "ok", 0.2)
    m.observe_call("web.default", "reviews.default", "", "503", "upstream_error", 0.001)
    labels = {
        "direction": "outbound",
        "source": "web.default",
        "destination": "reviews.default",
        "route": "get-reviews",
        "code": "200",
        "reason": "ok",
    }
    assert registry.get_sample_value("mesh_requests_total", labels) == 2
    assert registry.get_sample_value("mesh_request_duration_seconds_count", labels) == 2
    total = registry.get_sample_value("mesh_request_duration_seconds_sum", labels)
    assert total == pytest.approx(0.203)
    # Buckets are cumulative and inclusive of their bound.
    le = dict(labels, le="0.005")
    assert registry.get_sample_value("mesh_request_duration_seconds_bucket", le) == 1
    le = dict(labels, le="0.25")
    assert registry.get_sample_value("mesh_request_duration_seconds_bucket", le) == 2
    le = dict(labels, le="+Inf")
    assert registry.get_sample_value("mesh_request_duration_seconds_bucket", le) == 2
    exposition = generate_latest(registry).decode()
    assert 'mesh_requests_total{code="503"' in exposition
    assert "# TYPE mesh_request_duration_seconds histogram" in exposition


def test_attempts_carry_their_own_code_and_circuit_state(registry: CollectorRegistry) -> None:
    m = MeshMetrics.for_registry(registry)
    attempts = [
        AttemptRecord(1, "127.0.0.1:9000", "status", status=503),
        AttemptRecord(2, "127.0.0.1:9001", "connect_failure"),
        AttemptRecord(3, "127.0.0.1:9000", "ok", status=200),
    ]
    m.observe_call("web.default", "reviews.default", "", "200", "ok", 0.01, attempts)
    base = {"direction": "outbound", "source": "web.default", "destination": "reviews.default"}
    expected = {
        ("127.0.0.1:9000", "503"): 1,
        ("127.0.0.1:9001", "connect_failure"): 1,
        ("127.0.0.1:9000", "200"): 1,
    }
    for (endpoint, code), n in expected.items():
        labels = dict(base, endpoint=endpoint, code=code)
        assert registry.get_sample_value("mesh_attempts_total", labels) == n
    # effective (per call, after retries): 1 of 1 succeeded; actual (per attempt): 1 of 3
    assert (
        registry.get_sample_value(
            "mesh_requests_total", {**base, "route": "", "code": "200", "reason": "ok"}
        )
        == 1
    )
    m.set_circuit_state("web.default", "reviews.default", "open")
    state = {"source": "web.default", "destination": "reviews.default"}
    assert registry.get_sample_value("mesh_circuit_state", state) == 1.0
    m.set_circuit_state("web.default", "reviews.default", "half_open")
    assert registry.get_sample_value("mesh_circuit_state", state) == 2.0


def test_labelled_children_are_cached_and_bounded(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = MeshMetrics.for_registry(registry)
    child = m.retries.labels("web.default", "reviews.default")
    assert m.retries.labels("web.default", "reviews.default") is child
    monkeypatch.setattr(metrics_module, "MAX_SERIES", 3)
    for i in range(10):
        m.faults.labels("web.default", f"svc-{i}.default", "abort").inc()
    samples = {
        s.labels["destination"]: s.value
        for family in registry.collect()
        if family.name == "mesh_faults_injected"
        for s in family.samples
        if s.name == "mesh_faults_injected_total"
    }
    assert len(samples) == 4  # three real series and one overflow
    assert samples["__overflow__"] == 7


def test_label_sets_are_bounded(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "MAX_SERIES", 5)
    m = MeshMetrics.for_registry(registry)
    for i in range(50):
        m.observe_call("web.default", "reviews.default", f"route-{i}", "200", "ok", 0.001)
    samples = [
        s
        for family in registry.collect()
        if family.name == "mesh_requests"
        for s in family.samples
        if s.name == "mesh_requests_total"
    ]
    assert len(samples) == 6  # five real series and one overflow bucket
    overflow = [s for s in samples if s.labels["route"] == "__overflow__"]
    assert overflow and overflow[0].value == 45


def test_two_meshes_share_one_registry(registry: CollectorRegistry) -> None:
    assert MeshMetrics.for_registry(registry) is MeshMetrics.for_registry(registry)
