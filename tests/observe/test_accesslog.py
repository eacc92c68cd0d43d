"""The access log over real sockets: exact JSON fields per outbound call and per inbound
request after scripted traffic (sync and async clients), the text format, the policy switch
following reloads, and a bad ``spec.accessLog`` rejected with its field."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e.conftest import service_yaml
from harness.server import run_uvicorn

import meshlib
from meshlib.observe.accesslog import access_log_of

pytestmark = pytest.mark.timeout(30)

ACCESS_JSON = (
    "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: mesh}\n"
    "spec: {accessLog: {enabled: true, format: json}}\n---\n"
)
NO_RETRIES = """---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: no-retries}
spec:
  target: {service: reviews}
  retries: {attempts: 0}
"""


def bare(name: str) -> str:
    return f"apiVersion: meshlib/v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{}}\n"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def access() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("meshlib.access")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def logged(mesh: meshlib.Mesh, access: Lines) -> list[dict[str, object]]:
    log = access_log_of(mesh)
    assert log is not None and log.flush()
    return [json.loads(line) for line in access.lines]


def test_one_json_line_per_outbound_call_with_exact_fields(
    caller, make_mesh, echo_factory, access: Lines
) -> None:
    backend = echo_factory("reviews")
    text = ACCESS_JSON + service_yaml("reviews", [backend.port]) + NO_RETRIES
    text += "---\n" + service_yaml("gone", [1])
    mesh = make_mesh(text)
    c = caller.bind(mesh)
    backend.set_status(503, path="/fail")
    c.get("http://reviews/ok?token=secret")
    c.get("http://reviews/fail")
    c.outcome("GET", "http://gone/x")

    lines = logged(mesh, access)
    for line in lines:
        assert isinstance(line.pop("time"), float) and isinstance(line.pop("duration_ms"), float)
    version = mesh.snapshot.version
    endpoint = f"127.0.0.1:{backend.port}"
    common = {"direction": "outbound", "source": "tester.default", "route": None}
    common |= {"method": "GET", "peer": None, "trace_id": None, "version": version}
    assert lines == [
        {
            **common,
            "destination": "reviews.default",
            "authority": "reviews",
            "path": "/ok",  # never the query string: it may carry secrets
            "status": 200,
            "code": "200",
            "flag": "ok",
            "reason": "ok",
            "attempts": 1,
            "retries": 0,
            "endpoint": endpoint,
        },
        {
            **common,
            "destination": "reviews.default",
            "authority": "reviews",
            "path": "/fail",
            "status": 503,
            "code": "503",
            "flag": "upstream_error",
            "reason": "upstream_error",
            "attempts": 1,
            "retries": 0,
            "endpoint": endpoint,
        },
        {
            **common,
            "destination": "gone.default",
            "authority": "gone",
            "path": "/x",
            "status": None,
            "code": "error",
            "flag": "connect_failure",
            "reason": "connect_failure",
            "attempts": lines[2]["attempts"],  # the default retry policy retries connects
            "retries": lines[2]["retries"],
            "endpoint": "127.0.0.1:1",
        },
    ]
    assert lines[2]["attempts"] == lines[2]["retries"] + 1  # type: ignore[operator]


async def _hello(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await send({"type": "http.response.body", "body": b"hi"})


def test_one_line_per_inbound_request(make_mesh, access: Lines) -> None:
    mesh = make_mesh(bare("tester"), access_log="json")
    app = meshlib.MeshMiddleware(_hello, mesh=mesh, rate_limit=(0.001, 1))
    with run_uvicorn(app) as server:
        assert httpx.post(server.url + "/orders/7?q=1").status_code == 201
        assert httpx.get(server.url + "/orders/8").status_code == 429
    lines = logged(mesh, access)
    for line in lines:
        assert line.pop("duration_ms") >= 0 and line.pop("time")  # type: ignore[operator]
    authority = server.url.removeprefix("http://")
    common = {"direction": "inbound", "source": "unauthenticated", "route": None}
    common |= {"destination": "tester.default", "authority": authority, "attempts": 0}
    common |= {"retries": 0, "endpoint": None, "peer": None, "trace_id": None, "version": None}
    assert lines == [
        {**common, "method": "POST", "path": "/orders/7", "status": 201, "code": "201"}
        | {"flag": "ok", "reason": "ok"},
        {**common, "method": "GET", "path": "/orders/8", "status": 429, "code": "429"}
        | {"flag": "rate_limited", "reason": "rate_limited"},
    ]


def test_policy_switches_the_log_on_reload_and_text_format(
    tmp_path: Path, echo_factory, access: Lines
) -> None:
    from prometheus_client import CollectorRegistry

    backend = echo_factory("reviews")
    path = tmp_path / "policy.yaml"
    services = service_yaml("reviews", [backend.port])
    path.write_text(services)
    with (
        meshlib.Mesh.from_file(
            path, service="tester", watch=False, registry=CollectorRegistry()
        ) as mesh,
        mesh.client() as client,
    ):
        assert mesh.events is None and access_log_of(mesh) is None
        client.get("http://reviews/a")

        path.write_text(ACCESS_JSON.replace("json", "text") + services)
        assert mesh.reload()
        log = access_log_of(mesh)
        assert log is not None and log.format == "text"
        client.get("http://reviews/b")
        assert log.flush()
        (line,) = access.lines
        assert '"GET reviews/b" 200 ok' in line and "-> reviews.default" in line

        path.write_text(services)
        assert mesh.reload()
        assert access_log_of(mesh) is None and mesh.events is None
        client.get("http://reviews/c")
        assert len(access.lines) == 1


def test_access_log_argument_wins_over_the_policy(make_mesh) -> None:
    mesh = make_mesh(ACCESS_JSON + bare("reviews"), access_log="text")
    log = access_log_of(mesh)
    assert log is not None and log.format == "text"


def test_bad_access_log_format_is_rejected_with_its_field() -> None:
    with pytest.raises(meshlib.ConfigError) as info:
        meshlib.Mesh.from_text(
            ACCESS_JSON.replace("json", "xml") + bare("r"), service="t", metrics=False
        )
    (problem,) = info.value.problems
    assert problem.field == "spec.accessLog.format" and problem.line == 4


def test_a_slow_handler_never_blocks_the_caller_and_drops_are_counted() -> None:
    import threading

    from meshlib.observe.accesslog import AccessLog
    from meshlib.observe.events import CallEvent, Flag

    release = threading.Event()

    class Stuck(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            release.wait(10)

    logger = logging.getLogger("meshlib.access.stuck-test")
    logger.addHandler(Stuck())
    log = AccessLog("json", max_pending=5, logger_=logger)
    try:
        event = CallEvent(
            0.0, "outbound", "a", "b", None, "GET", "b", "/", 200, "200", 0.0, Flag.OK, "ok"
        )
        for _ in range(20):  # returns at once although the handler is stuck
            log(event)
        assert 14 <= log.dropped <= 15  # the writer may have taken the first one already
    finally:
        release.set()
        log.close()


def test_disabled_access_log_in_the_policy_builds_no_events() -> None:
    text = ACCESS_JSON.replace("enabled: true, format: json", "enabled: false") + bare("r")
    with meshlib.Mesh.from_text(text, service="t", metrics=False) as mesh:
        assert mesh.snapshot.mesh.access_log is None
        assert access_log_of(mesh) is None and mesh.events is None
