"""Metric values after scripted traffic over real sockets: exact counts per call and per
attempt, so the effective (after retries) and actual (per attempt) success rates differ exactly
as the traffic did; histograms filled; every call counted once whatever its attempts."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from e2e.conftest import service_yaml

pytestmark = pytest.mark.timeout(30)

POLICY = (
    "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
    "spec:\n  target: {service: reviews}\n"
    "  retries: {attempts: 2, retryOn: [5xx]}\n"
    "  circuitBreaker: {consecutiveFailures: 1000}\n"
    "  outlierDetection: {consecutiveFailures: 1000}\n"
)


def test_effective_and_actual_success_are_both_counted(caller, make_mesh, echo_factory) -> None:
    backend = echo_factory("reviews")
    backend.set_status(503, times=4)  # call 1: 503 x 3 (gives up); call 2: 503, 200; then 200s
    registry = CollectorRegistry()
    mesh = make_mesh(service_yaml("reviews", [backend.port]) + POLICY, registry=registry)
    c = caller.bind(mesh)
    assert [c.get("http://reviews/r").status_code for _ in range(4)] == [503, 200, 200, 200]

    call = {
        "direction": "outbound",
        "source": "tester.default",
        "destination": "reviews.default",
        "route": "",
        "code": "200",
        "reason": "ok",
    }
    failed_call = {**call, "code": "503", "reason": "upstream_error"}
    assert registry.get_sample_value("mesh_requests_total", call) == 3  # effective: 3 of 4
    assert registry.get_sample_value("mesh_requests_total", failed_call) == 1
    assert registry.get_sample_value("mesh_request_duration_seconds_count", call) == 3
    assert (
        registry.get_sample_value("mesh_request_duration_seconds_bucket", {**call, "le": "10.0"})
        == 3
    )
    attempt = {
        "direction": "outbound",
        "source": "tester.default",
        "destination": "reviews.default",
        "endpoint": f"127.0.0.1:{backend.port}",
    }
    ok = registry.get_sample_value("mesh_attempts_total", {**attempt, "code": "200"})
    failed = registry.get_sample_value("mesh_attempts_total", {**attempt, "code": "503"})
    assert (ok, failed) == (3, 4)  # actual: 3 of 7
    retries = {"source": "tester.default", "destination": "reviews.default"}
    assert registry.get_sample_value("mesh_retries_total", retries) == 3
    assert backend.requests == 7
