"""The gateway's listeners (meshlib.gateway.serve): a request head that does not finish in time
closes its connection (slowloris), idle or trickling; a prompt request on the same server is
served; the h11 head limit follows the edge limits (issue 14)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from meshlib.gateway.edge import EdgeLimits
from meshlib.gateway.serve import EdgeTimeouts, head_limit
from tests.gateway.fixtures import gateway_policy, running_gateway, web_gateway
from tests.gateway.running import RunningGateway
from tests.harness.echo import EchoBackend

pytestmark = pytest.mark.timeout(30)

HEAD_TIMEOUT = 0.5


@pytest.fixture
def gateway() -> Iterator[tuple[RunningGateway, EchoBackend]]:
    backend = EchoBackend("web")
    backend.serve()
    try:
        with running_gateway(
            gateway_policy({"shop/web": backend.port}),
            web_gateway(),
            ports={80: 0},
            timeouts=EdgeTimeouts(header_timeout=HEAD_TIMEOUT),
        ) as running:
            yield running, backend
    finally:
        backend.stop()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer closes ``sock`` within ``seconds`` (reads until EOF or the bound)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_an_unfinished_request_head_is_cut_and_a_prompt_one_served(
    gateway: tuple[RunningGateway, EchoBackend],
) -> None:
    running, backend = gateway
    port = running.port(80)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle:
        # Nothing at all, then a head that trickles in one header at a time.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: shop.example.com\r\n")
            started = time.monotonic()
            for i in range(3):
                slow.sendall(f"x-slow-{i}: 1\r\n".encode())
                time.sleep(HEAD_TIMEOUT / 4)
            assert _closed_within(slow, 10 * HEAD_TIMEOUT)
            assert time.monotonic() - started < 10 * HEAD_TIMEOUT
        assert _closed_within(idle, 10 * HEAD_TIMEOUT)
    response = httpx.get(f"http://127.0.0.1:{port}/", headers={"host": "a"}, timeout=5)
    assert response.status_code == 200
    assert backend.requests == 1  # the cut heads never reached it


def test_a_kept_alive_connection_gets_a_fresh_head_timer_per_request(
    gateway: tuple[RunningGateway, EchoBackend],
) -> None:
    running, _ = gateway
    with httpx.Client(base_url=f"http://127.0.0.1:{running.port(80)}", timeout=5) as client:
        for _ in range(3):
            time.sleep(HEAD_TIMEOUT / 2)  # under the timer each time, over it in total
            assert client.get("/", headers={"host": "a"}).status_code == 200
        assert client.get("/", headers={"host": "a"}).status_code == 200


def test_the_h11_head_limit_follows_the_edge_limits() -> None:
    limits = EdgeLimits()
    assert head_limit(limits) == 60 * 1024 + 8 * 1024 + 1024
    assert head_limit(EdgeLimits(max_header_bytes=None)) is None
