"""An inbound request's deadline (meshlib.context.inbound_deadline) caps outbound calls made
while handling it: they get only the time that is left, and say so downstream."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

import meshlib
from e2e.conftest import service_yaml
from meshlib.context import inbound_deadline
from meshlib.outbound.call import DEADLINE_HEADER

pytestmark = pytest.mark.timeout(30)


def test_sync_call_inherits_the_inbound_deadline(make_mesh, echo_factory) -> None:
    slow = echo_factory("slow")
    slow.set_delay(2.0)
    mesh = make_mesh(service_yaml("reviews", [slow.port]))  # no timeout configured
    token = inbound_deadline.set(time.monotonic() + 0.3)
    try:
        with mesh.client() as client:
            start = time.monotonic()
            with pytest.raises(meshlib.MeshTimeout) as caught:
                client.get("http://reviews/slow")
            elapsed = time.monotonic() - start
    finally:
        inbound_deadline.reset(token)
    assert elapsed < 1.5  # far below the backend's 2 s
    assert caught.value.decision is not None
    assert caught.value.decision.deadline is not None and caught.value.decision.deadline <= 0.3
    assert slow.wait_for_requests(1)
    assert int(slow.last_headers[DEADLINE_HEADER]) <= 300


def test_async_call_inherits_the_inbound_deadline(make_mesh, echo_factory) -> None:
    backend = echo_factory("fast")
    mesh = make_mesh(
        service_yaml("reviews", [backend.port])
        + "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
        "spec: {target: {service: reviews}, timeout: 10s}\n"
    )

    async def handler() -> httpx.Response:
        async with mesh.async_client() as client:
            return await client.get("http://reviews/x")

    token = inbound_deadline.set(time.monotonic() + 0.5)
    try:
        response = asyncio.run(handler())  # the task runs in a copy of this context
    finally:
        inbound_deadline.reset(token)
    assert response.status_code == 200
    assert int(response.json()["headers"][DEADLINE_HEADER]) <= 500  # not the policy's 10 s
    assert response.extensions["mesh_decision"].deadline <= 0.5


def test_policy_deadline_applies_when_shorter(make_mesh, echo_factory) -> None:
    backend = echo_factory("fast")
    mesh = make_mesh(
        service_yaml("reviews", [backend.port])
        + "---\napiVersion: meshlib/v1\nkind: TrafficPolicy\nmetadata: {name: p}\n"
        "spec: {target: {service: reviews}, timeout: 200ms}\n"
    )
    token = inbound_deadline.set(time.monotonic() + 30.0)
    try:
        with mesh.client() as client:
            r = client.get("http://reviews/x")
    finally:
        inbound_deadline.reset(token)
    assert r.extensions["mesh_decision"].deadline == pytest.approx(0.2)
    assert int(r.json()["headers"][DEADLINE_HEADER]) <= 200
