"""The Gateway API mesh conformance cases, run in process: real echo backends, a real mesh client.

Each transcribed upstream case (tests/config/gateway_conformance.py) is its own test, through
both the sync and the async client: its policy is the generated Services plus the vendored
manifest, unchanged; its request goes from the ``echo-v1`` client in the case's namespace;
harness.conformance lists where the answer differs. Redirects are not followed (httpx's
default); the mesh answers its own failures as responses (``local_responses``), since upstream
expects statuses such as 404 and 500 from the mesh.

Run just this file with ``.venv/bin/python -m pytest -q tests/e2e/test_gateway_conformance.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from config.gateway_conformance import CASES, WEIGHTS, Case
from harness import EchoBackend, assert_threads_stopped
from harness.conformance import (
    CLIENT,
    SERVICES,
    case_ids,
    mismatches,
    policy_for,
    request_for,
    share_mismatches,
)
from prometheus_client import CollectorRegistry

import meshlib
from e2e.conftest import CallerFactory

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SEED = 14
#: Requests in the weighted batch: at 5 sigma a 70/30 split may stray by ±72 answers.
BATCH = 1000


@pytest.fixture(scope="module")
def addresses() -> Iterator[dict[str, str]]:
    """One echo backend per upstream service for the whole module; ``host:port`` by name."""
    backends: list[EchoBackend] = []
    try:
        for name in SERVICES:
            backend = EchoBackend(name)
            backend.serve()
            backends.append(backend)
        yield {b.name: f"127.0.0.1:{b.port}" for b in backends}
    finally:
        names = [b.server.thread_name for b in backends if b.server is not None]
        for backend in reversed(backends):
            backend.stop()
        assert_threads_stopped(names)


@pytest.fixture
def mesh_for(addresses: dict[str, str]) -> Iterator[Callable[[Case], meshlib.Mesh]]:
    """``mesh_for(case)`` → the case's client mesh (closed at teardown)."""
    made: list[meshlib.Mesh] = []

    def make(case: Case) -> meshlib.Mesh:
        mesh = meshlib.Mesh(
            policy_for(case, addresses, ROOT),
            service=CLIENT,
            namespace=case.client_namespace,
            seed=SEED,
            registry=CollectorRegistry(),
            local_responses=True,
        )
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()


@pytest.mark.parametrize("case", CASES, ids=case_ids())
def test_case(
    case: Case,
    addresses: dict[str, str],
    mesh_for: Callable[[Case], meshlib.Mesh],
    caller: CallerFactory,
) -> None:
    client = caller.bind(mesh_for(case))
    request = request_for(case, addresses)
    response = client.request(request.method, request.url, headers=list(request.headers))
    problems = mismatches(case, response)
    assert not problems, (
        f"{case.test} {case.name or ''}: {request.method} {request.url} headers "
        f"{list(request.headers)} -> {response.status_code} {dict(response.headers)} "
        f"{response.text[:300]!r}: " + "; ".join(problems)
    )
    weights = WEIGHTS.get(case.test)
    if weights is not None:
        batch = client.many(BATCH, request.method, request.url, headers=list(request.headers))
        errors = [r for r in batch if isinstance(r, Exception)]
        assert not errors, f"{len(errors)} of {BATCH} calls failed, first: {errors[0]!r}"
        answered = [r.headers.get("x-backend") for r in batch if not isinstance(r, Exception)]
        assert not (off := share_mismatches(answered, weights)), f"{case.test}: {off}"


#: Cases whose answer no route changes (a pod dialled directly, a Host header naming another
#: service, a port the route excludes): with the manifest left out they pass today, which
#: checks the runner's own part (pod address, Host header, ports) on real sockets.
ROUTE_FREE = {"MeshFrontend-1", "MeshFrontendHostname-1", "MeshPorts-1"}


ROUTE_FREE_CASES = {i: c for i, c in zip(case_ids(), CASES, strict=True) if i in ROUTE_FREE}


@pytest.mark.parametrize("case", list(ROUTE_FREE_CASES.values()), ids=list(ROUTE_FREE_CASES))
def test_the_runner_reaches_the_backend_a_case_names_without_a_route(
    case: Case,
    addresses: dict[str, str],
    mesh_for: Callable[[Case], meshlib.Mesh],
    caller: CallerFactory,
) -> None:
    bare = replace(case, manifest=None)
    client = caller.bind(mesh_for(bare))
    request = request_for(bare, addresses)
    response = client.request(request.method, request.url, headers=list(request.headers))
    assert mismatches(bare, response) == []
    sent_host = dict(case.headers).get("Host", request.url.split("/")[2])
    assert response.json()["headers"]["host"] == sent_host
