"""The pytest plugin (meshlib.testing, entry point ``pytest11``): ``mesh_faults`` injects aborts,
delays and refused connections into real calls for one test, and they vanish afterwards.

Each test runs a small test file with ``pytester``, the way a user's suite would use the plugin:
the plugin is found through its entry point (the package is installed), the inner tests call a
real uvicorn echo backend through a mesh, and the outer test checks their outcomes.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]


def _import_every_meshlib_module() -> None:
    """pytester's in-process runs restore sys.modules afterwards, so a module first imported by
    an inner run (meshlib loads YAML, metrics, tracing... lazily) is imported afresh by the next
    one or by a later test, and then holds other copies of classes and enums than the modules
    that imported it before: PyYAML's C loader stops recognising a fresh ``yaml``'s nodes, and
    the call sequence stops recognising a fresh module's enum members (a refused connection no
    longer retried, in tests/e2e run after this file). Importing all of meshlib here puts every
    module, and what it imports, in the snapshot each inner run starts from and returns to."""
    import meshlib

    for module in pkgutil.walk_packages(meshlib.__path__, "meshlib."):
        if not module.name.endswith(".__main__"):  # that one runs the CLI
            importlib.import_module(module.name)


_import_every_meshlib_module()

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
            with pytest.raises(LookupError, match="no fixture named 'mesh' gives a mesh"):
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


def test_unknown_service_names_the_known_ones(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_unknown="""
        import pytest

        def test_typo(mesh_faults):
            with pytest.raises(ValueError) as info:
                mesh_faults.abort("ratingz")
            assert str(info.value) == (
                "unknown service 'ratingz' (did you mean 'ratings'?); "
                "known services: ratings, reviews"
            )

        def test_far_off(mesh_faults):
            with pytest.raises(ValueError) as info:
                mesh_faults.refuse("zzz")
            assert str(info.value) == "unknown service 'zzz'; known services: ratings, reviews"

        def test_qualified_typo(mesh_faults):
            with pytest.raises(ValueError, match="did you mean 'reviews.default'"):
                mesh_faults.delay("reviewz.default", 1.0)
        """
    )
    result = pytester.runpytest(*ARGS)
    result.assert_outcomes(passed=3)


#: A project whose mesh fixture is not called ``mesh``: it names it in its ini file.
NAMED_CONFTEST = CONFTEST.replace("def mesh(backend)", "def my_mesh(backend)").replace(
    "def client(mesh):\n    with mesh.client()", "def client(my_mesh):\n    with my_mesh.client()"
)


def test_a_project_names_its_mesh_fixture(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(NAMED_CONFTEST)
    pytester.makeini("[pytest]\nmeshlib_mesh_fixture = my_mesh\n")
    pytester.makepyfile(
        test_named="""
        def test_requested(my_mesh, mesh_faults, client):
            mesh_faults.abort("ratings", status=418)
            assert client.get("http://ratings/r").status_code == 418

        def test_found_lazily(mesh_faults, request):
            mesh_faults.abort("ratings", status=503)
            with request.getfixturevalue("my_mesh").client() as c:
                assert c.get("http://ratings/r").status_code == 503
        """
    )
    result = pytester.runpytest(*ARGS)
    result.assert_outcomes(passed=2)


def test_a_missing_mesh_fixture_says_how_to_name_one(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(NAMED_CONFTEST)  # defines my_mesh, but the ini does not name it
    pytester.makepyfile(
        test_unnamed="""
        import pytest

        def test_no_mesh(mesh_faults):
            with pytest.raises(LookupError) as info:
                mesh_faults.abort("ratings")
            assert str(info.value) == (
                "no fixture named 'mesh' gives a mesh: define it, set "
                "`meshlib_mesh_fixture = <your fixture>` in the [pytest] ini options, "
                "or pass mesh=... explicitly"
            )
        """
    )
    pytester.makepyfile(
        test_not_a_mesh="""
        import pytest

        @pytest.fixture
        def mesh():
            return 42

        def test_not_a_mesh(mesh, mesh_faults):
            with pytest.raises(LookupError, match="fixture 'mesh' gives int, not a meshlib.Mesh"):
                mesh_faults.abort("ratings")
        """
    )
    result = pytester.runpytest(*ARGS)
    result.assert_outcomes(passed=2)
    help_text = pytester.runpytest(*ARGS, "--help")
    help_text.stdout.fnmatch_lines(
        ["*meshlib_mesh_fixture (string):*", "*name of the fixture that gives the test's*"]
    )


#: Two services on one echo backend, retried on 5xx: ``slow`` with a 30 s backoff (a test that
#: waited for it would hit its 20 s timeout), ``quick`` with a 20 ms one (to show the record).
RETRY_CONFTEST = (
    CONFTEST.replace("metadata: {{name: reviews}}", "metadata: {{name: quick}}")
    .replace("metadata: {{name: ratings}}", "metadata: {{name: slow}}")
    .replace(
        "'''\n    with meshlib.Mesh",
        """---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: slow-retries}}
spec:
  target: {{service: slow}}
  timeout: 300s
  retries: {{attempts: 2, retryOn: [5xx], backoff: {{baseInterval: 30s, maxInterval: 30s}}}}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: quick-retries}}
spec:
  target: {{service: quick}}
  retries: {{attempts: 2, retryOn: [5xx], backoff: {{baseInterval: 20ms, maxInterval: 20ms}}}}
'''
    with meshlib.Mesh""",
    )
)

RETRIES = """
import pytest

from meshlib.testing import instant_retries

pytestmark = pytest.mark.timeout(20)


def test_fixture(mesh_instant_retries, client, backend):
    backend.set_status(503, times=2)
    r = client.get("http://slow/r")
    assert r.status_code == 200
    decision = r.extensions["mesh_decision"]
    assert [a.status for a in decision.attempts] == [503, 503, 200]  # every retry still made
    assert [a.backoff for a in decision.attempts] == [0.0, 0.0, 0.0]


def test_retry_after_is_not_waited_either(mesh_instant_retries, client, backend):
    backend.set_status(503, headers={"retry-after": "8"}, times=1)
    r = client.get("http://slow/r")
    assert r.status_code == 200
    assert [a.backoff for a in r.extensions["mesh_decision"].attempts] == [0.0, 0.0]


def test_context_manager_on_one_mesh_restores(mesh, client, backend):
    with instant_retries(mesh):
        with instant_retries(mesh):
            backend.set_status(503, times=2)
            assert client.get("http://slow/r").extensions["mesh_decision"].retries == 2
        assert mesh.instant_backoff  # the outer block is still in force
    assert not mesh.instant_backoff


def test_without_the_switch_the_backoff_is_waited_and_recorded(client, backend):
    backend.set_status(503, times=1)
    r = client.get("http://quick/r")
    backoff = [a.backoff for a in r.extensions["mesh_decision"].attempts]
    assert 0.0 < backoff[0] <= 0.02 and backoff[1:] == [0.0], backoff


def test_async_client(mesh_instant_retries, backend):
    import asyncio

    async def go():
        async with mesh_instant_retries.async_client() as c:
            return await c.get("http://slow/r")

    backend.set_status(503, times=2)
    r = asyncio.run(go())
    assert r.status_code == 200
    assert [a.backoff for a in r.extensions["mesh_decision"].attempts] == [0.0, 0.0, 0.0]
"""


@pytest.mark.timeout(90)
def test_instant_retries_make_backoff_zero_and_keep_every_attempt(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(RETRY_CONFTEST)
    pytester.makepyfile(test_retries=RETRIES)
    result = pytester.runpytest(*ARGS, "-v")
    result.assert_outcomes(passed=5)


def test_a_large_mesh_lists_twenty_services_and_counts_the_rest() -> None:
    from prometheus_client import CollectorRegistry

    import meshlib

    text = "---\n".join(
        f"apiVersion: meshlib/v1\nkind: Service\nmetadata: {{name: svc{i:02d}}}\nspec: {{}}\n"
        for i in range(25)
    )
    with (
        meshlib.Mesh.from_text(text, service="t", registry=CollectorRegistry()) as mesh,
        pytest.raises(ValueError) as info,
    ):
        mesh.inject_fault("other", abort=503)
    listed = ", ".join(f"svc{i:02d}" for i in range(20))
    assert str(info.value) == f"unknown service 'other'; known services: {listed}, ... (5 more)"
