"""The admin app and the meshctl verbs against a real uvicorn admin server, after scripted
traffic to real echo backends: status with the last rejected reload, an ejected endpoint,
a tap bounded by count and by time, exact top numbers, and the verbs' output."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e.conftest import service_yaml
from harness.server import ServerHandle, run_uvicorn

import meshlib
from meshlib.cli import main
from observe.test_tap_top import event

pytestmark = pytest.mark.timeout(30)

NO_RETRIES = """---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: reviews-policy}
spec:
  target: {service: reviews}
  retries: {attempts: 0}
  circuitBreaker: {consecutiveFailures: 1000}
  loadBalancer: {type: round-robin}
  outlierDetection: {consecutiveFailures: 2, baseEjectionTime: 30s, maxEjectionPercent: 50}
"""


@pytest.fixture
def serve_admin() -> Iterator[Callable[[meshlib.Mesh], ServerHandle]]:
    started: list[tuple[ServerHandle, Any]] = []

    def serve(mesh: meshlib.Mesh) -> ServerHandle:
        app = mesh.admin_app(top_window=60.0)
        server = run_uvicorn(app, name="admin")
        started.append((server, app))
        return server

    yield serve
    for server, app in started:
        server.stop()
        app.close()


def get(server: ServerHandle, path: str) -> Any:
    response = httpx.get(server.url + path, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def test_status_shows_the_version_and_the_last_rejected_reload(
    tmp_path: Path, echo_factory, serve_admin, capsys
) -> None:
    from prometheus_client import CollectorRegistry

    backend = echo_factory("reviews")
    path = tmp_path / "policy.yaml"
    good = service_yaml("reviews", [backend.port])
    path.write_text(good)
    with meshlib.Mesh.from_file(
        path, service="tester", watch=False, registry=CollectorRegistry()
    ) as mesh:
        server = serve_admin(mesh)
        version = mesh.snapshot.version
        path.write_text(good + "---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {}\n")
        assert not mesh.reload()

        status = get(server, "/status")
        assert status["service"] == "tester.default"
        assert status["snapshot"]["version"] == version
        assert status["snapshot"]["files"] == [str(path)]
        assert status["reload"]["ok"] is False
        (problem,) = status["last_rejected"]["error"]["problems"]
        assert problem["file"] == str(path) and problem["document"] == 2 and problem["line"] > 0

        path.write_text(good.replace("reviews", "ratings"))
        assert mesh.reload()
        status = get(server, "/status")
        assert status["reload"]["ok"] is True and status["snapshot"]["version"] > version
        assert status["last_rejected"]["error"]["problems"] == [problem]  # kept after
        assert get(server, "/config")["documents"][0]["metadata"]["name"] == "ratings"

        assert main(["status", server.url]) == 0
        out = capsys.readouterr().out
        assert f"version {mesh.snapshot.version}" in out
        assert "last rejected" in out and problem["text"] in out
        assert main(["status", server.url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["status"]["reload"]["ok"] is True


def test_endpoints_show_an_ejected_endpoint_and_meshctl_status_the_table(
    make_mesh, echo_factory, serve_admin, capsys
) -> None:
    good, bad = echo_factory("good"), echo_factory("bad")
    bad.set_status(503)
    mesh = make_mesh(service_yaml("reviews", [good.port, bad.port]) + NO_RETRIES)
    server = serve_admin(mesh)
    with mesh.client() as client:
        for _ in range(4):  # round robin: two failures on `bad` eject it
            client.get("http://reviews/x")
    (dest,) = get(server, "/endpoints")["destinations"]
    assert dest["destination"] == "reviews.default" and dest["breaker"] == "closed"
    assert dest["in_flight"] == 0 and dest["ejections"] == 1
    assert isinstance(dest["retry_budget"], float)
    rows = {row["address"]: row for row in dest["endpoints"]}
    ejected, healthy = rows[f"127.0.0.1:{bad.port}"], rows[f"127.0.0.1:{good.port}"]
    assert ejected["healthy"] is False and 0 < ejected["ejected_for_seconds"] <= 30
    assert ejected["times_ejected"] == 1 and ejected["requests"] == 2
    assert healthy["healthy"] is True and healthy["ejected_until"] is None
    assert healthy["ewma_ms"] > 0 and healthy["in_flight"] == 0

    assert main(["status", server.url]) == 0
    out = capsys.readouterr().out
    assert "DESTINATION" in out and "ejected" in out and f"127.0.0.1:{bad.port}" in out


def test_tap_stream_keeps_its_first_events_when_the_reader_lags(
    make_mesh: Callable[..., meshlib.Mesh],
) -> None:
    """A /tap stream ends after `limit` events, so while its reader is busy sending, events
    past its queue are the ones dropped, never one in the middle (a lagging reader used to print
    /0 /1 /3 /4 /5: the oldest queued event was dropped for a newer one). No sockets: the
    ASGI app is driven directly and lags on purpose."""
    from meshlib.observe.admin import AdminApp

    app = AdminApp(make_mesh(service_yaml("reviews", [1])))
    app.tap(event(0))
    app.tap(event(1))
    paths: list[str] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            paths.append(json.loads(message["body"])["path"])
            if len(paths) == 2:  # six events arrive while the reader is still sending
                for n in range(2, 8):
                    app.tap(event(n))

    scope = {"type": "http", "method": "GET", "path": "/tap", "query_string": b"limit=5&seconds=5"}
    try:
        asyncio.run(app(scope, receive, send))
    finally:
        app.close()
    assert paths == ["/0", "/1", "/2", "/3", "/4"]


def test_tap_streams_recent_then_live_events_and_stops_at_the_limit(
    make_mesh, echo_factory, serve_admin
) -> None:
    backend = echo_factory("reviews")
    mesh = make_mesh(service_yaml("reviews", [backend.port]) + NO_RETRIES)
    server = serve_admin(mesh)
    lines: list[dict[str, Any]] = []

    def read() -> None:
        with httpx.stream("GET", server.url + "/tap?limit=5&seconds=20", timeout=25) as r:
            lines.extend(json.loads(line) for line in r.iter_lines() if line)

    with mesh.client() as client:
        client.get("http://reviews/0")
        client.get("http://reviews/1")
        reader = threading.Thread(target=read)
        reader.start()
        tap = _tap_of(mesh)
        assert _wait(lambda: tap.subscribers == 1)
        for n in range(2, 8):  # more than the limit: the stream ends at 5 all the same
            client.get(f"http://reviews/{n}")
        reader.join(10)
    assert not reader.is_alive()
    assert [line["path"] for line in lines] == ["/0", "/1", "/2", "/3", "/4"]
    assert all(line["flag"] == "ok" and line["direction"] == "outbound" for line in lines)
    assert _wait(lambda: tap.subscribers == 0)  # the stream's subscription is gone


def test_tap_time_bound_filters_and_bad_parameters(
    make_mesh, echo_factory, serve_admin, capsys
) -> None:
    backend = echo_factory("reviews")
    text = (
        service_yaml("reviews", [backend.port]) + "---\n" + service_yaml("ratings", [backend.port])
    )
    mesh = make_mesh(text)
    server = serve_admin(mesh)
    with mesh.client() as client:
        client.get("http://reviews/a")
        client.get("http://ratings/b")
    response = httpx.get(server.url + "/tap?seconds=0.2&destination=ratings", timeout=5)
    assert response.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(x)["path"] for x in response.text.splitlines()] == ["/b"]

    bad = httpx.get(server.url + "/tap?limit=0", timeout=5)
    assert bad.status_code == 400 and "limit must be between 1" in bad.json()["error"]
    assert httpx.get(server.url + "/nope", timeout=5).status_code == 404
    assert httpx.post(server.url + "/status", timeout=5).status_code == 405

    assert main(["tap", server.url, "--seconds", "0.2", "--destination", "reviews"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert '"GET reviews/a" 200 ok' in line and "outbound -> reviews.default" in line
    assert main(["tap", server.url, "--limit", "2", "--json"]) == 0
    assert [json.loads(x)["path"] for x in capsys.readouterr().out.splitlines()] == ["/a", "/b"]


def test_top_counts_exactly_and_meshctl_top_prints_the_table(
    make_mesh, echo_factory, serve_admin, capsys
) -> None:
    backend = echo_factory("reviews")
    backend.set_status(503, path="/fail")
    mesh = make_mesh(service_yaml("reviews", [backend.port]) + NO_RETRIES)
    server = serve_admin(mesh)
    with mesh.client() as client:
        for n in range(10):
            client.get("http://reviews/fail" if n % 5 == 0 else f"http://reviews/{n}")
    top = get(server, "/top")
    (edge,) = top["edges"]
    assert edge["direction"] == "outbound" and edge["destination"] == "reviews.default"
    assert (edge["requests"], edge["successes"], edge["success_rate"]) == (10, 8, 0.8)
    assert edge["rate"] > 0 and 0 < edge["p50_ms"] <= edge["p99_ms"]

    assert main(["top", server.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "DIRECTION",
        "SOURCE",
        "DESTINATION",
        "ROUTE",
        "REQUESTS",
        "RATE",
        "SUCCESS",
        "P50",
        "P99",
    ]
    cells = out[1].split()
    assert cells[:5] == ["outbound", "tester.default", "reviews.default", "-", "10"]
    assert cells[5].endswith("/s") and cells[6] == "80.0%"
    assert cells[7].endswith("ms") and cells[8].endswith("ms")
    assert out[3].startswith("over the last 60s; SUCCESS: ")
    assert main(["top", server.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["edges"][0]["requests"] == 10


def test_meshctl_reports_an_unreachable_admin_app(capsys) -> None:
    assert main(["status", "http://127.0.0.1:1", "--timeout", "2"]) == 1
    assert "meshctl status:" in capsys.readouterr().err


def _tap_of(mesh: meshlib.Mesh) -> Any:
    from meshlib.observe.tap import Tap

    assert mesh.events is not None
    return next(c for c in mesh.events.consumers if isinstance(c, Tap))


def _wait(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a state that has no event to wait on (a subscription appearing server-side)."""
    done = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return True
        done.wait(0.005)
    return predicate()


# --- the verbs' output and URLs (issue 10 items 8, 11, 12) --------------------------------------

STATUS_KEYS = {
    "service",
    "snapshot",
    "reload",
    "last_rejected",
    "mtls",
    "access_log",
    "svid",
    "registry",
}
DESTINATION_KEYS = {
    "destination",
    "in_flight",
    "breaker",
    "retry_budget",
    "panic",
    "ejections",
    "endpoints",
}
ENDPOINT_KEYS = {
    "address",
    "weight",
    "healthy",
    "ejected_until",
    "ejected_for_seconds",
    "times_ejected",
    "consecutive_failures",
    "ewma_ms",
    "in_flight",
    "requests",
}
TOP_EDGE_KEYS = {
    "direction",
    "source",
    "destination",
    "route",
    "requests",
    "successes",
    "success_rate",
    "rate",
    "p50_ms",
    "p99_ms",
}


def test_status_says_never_and_puts_units_on_its_numbers(
    make_mesh, echo_factory, serve_admin, capsys
) -> None:
    backend = echo_factory("reviews")
    mesh = make_mesh(service_yaml("reviews", [backend.port]) + NO_RETRIES)
    server = serve_admin(mesh)
    with mesh.client() as client:
        client.get("http://reviews/x")
    assert main(["status", server.url]) == 0
    out = capsys.readouterr().out
    assert "last reload:  never (the policy in force was loaded at start)" in out
    assert "ok at -" not in out and " at -" not in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("DESTINATION"))
    assert header.split() == [
        "DESTINATION",
        "ENDPOINT",
        "HEALTH",
        "LATENCY",
        "INFLIGHT",
        "REQUESTS",
        "BREAKER",
        "RETRY_BUDGET",
    ]
    row = lines[lines.index(header) + 1].split()
    assert row[:3] == ["reviews.default", f"127.0.0.1:{backend.port}", "healthy"]
    assert row[3].endswith("ms") and float(row[3][:-2]) > 0
    assert row[4:7] == ["0", "1", "closed"] and row[8] in ("retry", "retries")
    assert "LATENCY: peak-EWMA latency of the endpoint" in out
    assert "RETRY_BUDGET: retries the destination may send now" in out


def test_status_top_and_tap_print_json_and_yaml_in_documented_shapes(
    make_mesh, echo_factory, serve_admin, capsys
) -> None:
    import yaml

    backend = echo_factory("reviews")
    mesh = make_mesh(service_yaml("reviews", [backend.port]) + NO_RETRIES)
    server = serve_admin(mesh)
    with mesh.client() as client:
        client.get("http://reviews/x")

    assert main(["status", server.url, "-o", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status) == {"status", "endpoints"}
    assert set(status["status"]) == STATUS_KEYS
    (dest,) = status["endpoints"]["destinations"]
    assert set(dest) == DESTINATION_KEYS and set(dest["endpoints"][0]) == ENDPOINT_KEYS
    assert main(["status", server.url, "-o", "yaml"]) == 0
    as_yaml = yaml.safe_load(capsys.readouterr().out)
    assert set(as_yaml) == {"status", "endpoints"}
    assert as_yaml["status"]["snapshot"] == status["status"]["snapshot"]

    assert main(["top", server.url, "-o", "json"]) == 0
    top = json.loads(capsys.readouterr().out)
    assert set(top) == {"window_seconds", "edges"} and top["window_seconds"] == 60.0
    assert set(top["edges"][0]) == TOP_EDGE_KEYS
    assert main(["top", server.url, "--output", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["edges"][0]["requests"] == 1

    assert main(["tap", server.url, "--limit", "1", "-o", "yaml"]) == 0
    (event,) = [e for e in yaml.safe_load_all(capsys.readouterr().out) if e]
    assert event["path"] == "/x" and event["direction"] == "outbound"


def test_admin_urls_without_a_scheme(make_mesh, echo_factory, serve_admin, capsys) -> None:
    backend = echo_factory("reviews")
    mesh = make_mesh(service_yaml("reviews", [backend.port]) + NO_RETRIES)
    server = serve_admin(mesh)
    with mesh.client() as client:
        client.get("http://reviews/x")
    bare = f"127.0.0.1:{server.port}"
    assert main(["status", bare]) == 0
    assert "service:      tester.default" in capsys.readouterr().out
    assert main(["top", bare + "/"]) == 0
    assert "reviews.default" in capsys.readouterr().out
    assert main(["tap", bare, "--limit", "1", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == "/x"


def test_meshctl_status_names_the_url_and_the_reason_on_one_line() -> None:
    """The real CLI, as a user runs it: one line on stderr, no traceback."""
    import subprocess
    import sys

    for url in ("http://127.0.0.1:1", "127.0.0.1:1"):
        done = subprocess.run(
            [sys.executable, "-m", "meshlib.cli", "status", url, "--timeout", "2"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr == (
            "meshctl status: http://127.0.0.1:1/status: connection refused "
            "(nothing listening there?)\n"
        )


def test_an_admin_error_is_one_line_naming_the_url(make_mesh, serve_admin, capsys) -> None:
    server = serve_admin(make_mesh(service_yaml("reviews", [9])))
    # the admin app has no /metrics: graph names the URL and the status, nothing more
    assert main(["graph", server.url]) == 1
    err = capsys.readouterr().err
    assert err == f"meshctl graph: {server.url}/metrics: HTTP 404\n"
    assert main(["graph", f"127.0.0.1:{server.port}/nope", "--timeout", "2"]) == 1
    assert capsys.readouterr().err == f"meshctl graph: {server.url}/nope: HTTP 404\n"
    assert main(["graph", "127.0.0.1:1", "--timeout", "2"]) == 1
    assert capsys.readouterr().err == (
        "meshctl graph: http://127.0.0.1:1/metrics: connection refused (nothing listening there?)\n"
    )


def test_status_pointed_at_something_else_says_so_on_one_line(capsys) -> None:
    """A metrics endpoint answers 200 with text: not an admin app, and no traceback."""
    from harness.server import run_uvicorn

    server = run_uvicorn(meshlib.metrics_app(), name="not-admin")
    try:
        assert main(["status", f"127.0.0.1:{server.port}"]) == 1
        assert capsys.readouterr().err == (
            f"meshctl status: {server.url}/status: not an admin app (the answer is not JSON)\n"
        )
        assert main(["tap", f"127.0.0.1:{server.port}", "--seconds", "1"]) == 1
        assert capsys.readouterr().err == (
            f"meshctl tap: {server.url}/tap: not an admin app (the answer is not JSON)\n"
        )
    finally:
        server.stop()


@pytest.mark.parametrize("verb", ["status", "tap", "top"])
def test_a_url_httpx_refuses_is_one_line_not_a_traceback(verb: str, capsys) -> None:
    assert main([verb, "http://a:b"]) == 1
    assert capsys.readouterr().err == (
        f"meshctl {verb}: http://a:b: not a URL (Invalid port: 'b')\n"
    )


@pytest.mark.parametrize("verb", ["status", "tap", "top", "graph"])
def test_a_timeout_of_zero_is_a_usage_error(verb: str, capsys) -> None:
    """Every observe verb refuses --timeout 0 at the command line (status used to try, and
    print 'Operation now in progress')."""
    assert main([verb, "127.0.0.1:1", "--timeout", "0"]) == 2
    assert "must be more than 0 seconds" in capsys.readouterr().err
