"""The simplest end-to-end path: a mesh service called through both clients."""

from __future__ import annotations

import pytest

from e2e.conftest import service_yaml

pytestmark = pytest.mark.timeout(30)


def test_call_reaches_backend_and_carries_decision(caller, make_mesh, echo_factory) -> None:
    a = echo_factory("a")
    mesh = make_mesh(service_yaml("reviews", [a.port]))
    c = caller.bind(mesh)
    for host in ("reviews", "reviews.default", "reviews.default.svc.cluster.local"):
        r = c.get(f"http://{host}/reviews/1")
        assert r.status_code == 200
        assert r.json()["backend"] == "a"
        assert r.json()["headers"]["host"] == host
        decision = r.extensions["mesh_decision"]
        assert decision.service == "reviews.default"
        assert decision.attempts[0].endpoint == f"127.0.0.1:{a.port}"
    assert a.requests == 3


def test_other_hosts_pass_through(caller, make_mesh, echo_factory) -> None:
    a = echo_factory("a")
    mesh = make_mesh(service_yaml("reviews", [a.port]))
    r = caller.bind(mesh).get(f"http://127.0.0.1:{a.port}/direct")
    assert r.status_code == 200
    assert "mesh_decision" not in r.extensions
