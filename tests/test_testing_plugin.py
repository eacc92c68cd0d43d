"""The pytest plugin (meshlib.testing, entry point ``pytest11``): ``mesh_faults`` injects aborts,
delays and refused connections into real calls for one test, and they vanish afterwards.

Each test runs a small test file with ``pytester``, the way a user's suite would use the plugin:
the plugin is found through its entry point (the package is installed), the inner tests call a
real uvicorn echo backend through a mesh, and the outer test checks their outcomes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.timeout(60)

TESTS_DIR = str(Path(__file__).resolve().parent)

#: Inner runs skip plugins they do not need (hypothesis alone costs ~1 s per run).
ARGS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")

#: An inner conftest: a real echo backend and a mesh shared by the whole inner module, so a
#: fault left behind by one test would be seen by the next one.
CONFTEST = f"""
import sys

sys.path.insert(0, {TESTS_DIR!r})

import pytest
from prometheus_client import CollectorRegistry

import meshlib
from harness import EchoBackend


@pytest.fixture(scope="module")
def backend():
    b = EchoBackend("ratings")
    b.serve()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def mesh(backend):
    text = f'''
apiVersion: meshlib/v1
kind: Service
metadata: {{{{name: ratings}}}}
spec:
  endpoints: [{{{{address: "127.0.0.1:{{backend.port}}"}}}}]
---
apiVersion: meshlib/v1
kind: Service
metadata: {{{{name: reviews}}}}
spec:
  endpoints: [{{{{address: "127.0.0.1:{{backend.port}}"}}}}]
'''
    with meshlib.Mesh.from_text(
        text, service="tester", seed=7, registry=CollectorRegistry()
    ) as m:
        yield m


@pytest.fixture
def client(mesh):
    with mesh.client() as c:
        yield c
"""

FAULTS = """
import asyncio
import time

import httpx
import pytest


def test_abort_with_status(mesh, mesh_faults, client, backend):
    before = backend.requests
    mesh_faults.abort("ratings", status=418)
    r = client.get("http://ratings/r")
    assert r.status_code == 418
    assert r.headers["x-mesh-reason"] == "fault_abort"
    assert r.extensions["mesh_decision"].faults == ["abort:418"]
    assert backend.requests == before  # the call never left the process
    assert client.get("http://reviews/r").status_code == 200  # other services untouched


def test_abort_percent(mesh_faults, client):
    mesh_faults.abort("ratings", status=503, percent=50)
    codes = [client.get("http://ratings/r").status_code for _ in range(200)]
    aborted = codes.count(503)
    assert 65 <= aborted <= 135, aborted  # binomial(200, 0.5): 5 sigma
    assert set(codes) == {200, 503}


def test_delay(mesh_faults, client, backend):
    mesh_faults.delay("ratings", 0.3)
    start = time.monotonic()
    r = client.get("http://ratings/r")
    assert time.monotonic() - start >= 0.3
    assert r.status_code == 200
    assert r.extensions["mesh_decision"].faults == ["delay:0.3s"]


def test_refuse(mesh_faults, client, backend):
    before = backend.requests
    mesh_faults.refuse("ratings")
    with pytest.raises(httpx.ConnectError) as info:
        client.get("http://ratings/r")
    decision = info.value.decision
    assert [a.outcome for a in decision.attempts] == ["connect_failure"] * 3  # 2 retries
    assert backend.requests == before


def test_header_match(mesh_faults, client):
    mesh_faults.abort("ratings", status=503, headers={"End-User": "jason"})
    assert client.get("http://ratings/r", headers={"end-user": "jason"}).status_code == 503
    assert client.get("http://ratings/r", headers={"end-user": "ann"}).status_code == 200
    assert client.get("http://ratings/r").status_code == 200


def test_async_client_and_handle(mesh, mesh_faults):
    handle = mesh_faults.abort("ratings", status=502)

    async def go():
        async with mesh.async_client() as c:
            first = (await c.get("http://ratings/r")).status_code
            handle.remove()  # a fault can also be removed early
            return first, (await c.get("http://ratings/r")).status_code

    assert asyncio.run(go()) == (502, 200)


def test_failing_test_leaves_no_fault(mesh_faults, client):
    mesh_faults.abort("ratings", status=503)
    mesh_faults.delay("reviews", 5.0)
    mesh_faults.refuse("reviews", headers={"x": "y"})
    assert client.get("http://ratings/r").status_code == 200, "fails on purpose"


def test_faults_vanished(mesh, client, backend):
    assert mesh.extra_faults("ratings.default", None) == ()
    assert mesh.extra_faults("reviews.default", None) == ()
    before = backend.requests
    start = time.monotonic()
    for host in ("ratings", "reviews"):
        for headers in ({}, {"end-user": "jason"}, {"x": "y"}):
            r = client.get(f"http://{host}/r", headers=headers)
            assert r.status_code == 200
            assert r.extensions["mesh_decision"].faults == []
    assert time.monotonic() - start < 2.0  # no delay left behind
    assert backend.requests == before + 6
"""


def test_faults_apply_for_one_test_only(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_faults=FAULTS)
    result = pytester.runpytest(*ARGS, "-v")
    result.assert_outcomes(passed=7, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_abort_with_status PASSED*",
            "*test_abort_percent PASSED*",
            "*test_delay PASSED*",
            "*test_refuse PASSED*",
            "*test_header_match PASSED*",
            "*test_async_client_and_handle PASSED*",
            "*test_failing_test_leaves_no_fault FAILED*",
            "*test_faults_vanished PASSED*",
        ]
    )
    result.stdout.fnmatch_lines(["*fails on purpose*"])


def test_mesh_found_when_not_requested_and_explicit_mesh(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_lookup="""
        import meshlib
        import pytest
        from prometheus_client import CollectorRegistry


        def test_mesh_fixture_found_lazily(mesh_faults, backend, request):
            # this test does not request `mesh`; the plugin still finds the fixture
            mesh_faults.abort("ratings", status=503)
            mesh = request.getfixturevalue("mesh")
            with mesh.client() as c:
                assert c.get("http://ratings/r").status_code == 503


        def test_explicit_mesh(mesh_faults, mesh, backend):
            text = (
                "apiVersion: meshlib/v1\\nkind: Service\\nmetadata: {name: ratings}\\n"
                f"spec: {{endpoints: [{{address: '127.0.0.1:{backend.port}'}}]}}\\n"
            )
            with meshlib.Mesh.from_text(
                text, service="other", registry=CollectorRegistry()
            ) as other:
                mesh_faults.abort("ratings", status=504, mesh=other)
                with other.client() as c:
                    assert c.get("http://ratings/r").status_code == 504
                with mesh.client() as c:  # the default mesh is untouched
                    assert c.get("http://ratings/r").status_code == 200


        def test_unknown_service(mesh_faults):
            with pytest.raises(ValueError, match="unknown service"):
                mesh_faults.abort("nope")


        def test_bad_arguments(mesh_faults):
            with pytest.raises(ValueError):
                mesh_faults.abort("ratings", status=42)
            with pytest.raises(ValueError):
                mesh_faults.delay("ratings", -1)
        """
    )
    result = pytester.runpytest(*ARGS)
    result.assert_outcomes(passed=4)


def test_without_a_mesh_the_error_says_what_to_do(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_nomesh="""
        import pytest

        def test_no_mesh(mesh_faults):
            with pytest.raises(LookupError, match="define a `mesh` fixture or pass mesh="):
                mesh_faults.abort("ratings")
        """
    )
    result = pytester.runpytest(*ARGS)
    result.assert_outcomes(passed=1)


def test_plugin_is_loaded_through_its_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x(mesh_faults):\n    assert mesh_faults is not None\n")
    result = pytester.runpytest(*ARGS, "--fixtures")
    result.stdout.fnmatch_lines(["mesh_faults*", "*Inject faults into calls made through a mesh*"])
    disabled = pytester.runpytest(*ARGS, "-p", "no:meshlib")
    disabled.assert_outcomes(errors=1)
    disabled.stdout.fnmatch_lines(["*fixture 'mesh_faults' not found*"])
