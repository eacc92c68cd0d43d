"""Checks that the real-sockets harness (uvicorn runner, echo, raw server, chaos proxy) behaves."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

import anyio
import httpx
import pytest
from harness import ChaosProxy, EchoBackend, RawServer, open_socket_count, run_uvicorn

pytestmark = pytest.mark.timeout(30)

EchoFactory = Callable[..., EchoBackend]
RawFactory = Callable[..., RawServer]
ChaosFactory = Callable[..., ChaosProxy]
BROKEN = (httpx.RemoteProtocolError, httpx.ReadError)
# An RST right after accept() races the client's connect(): it may surface as any of these.
RST_AT_ACCEPT = (httpx.ConnectError, httpx.WriteError, *BROKEN)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def poll(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Re-check a condition that has no event to wait on (bounded, 5 ms steps)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# ---------------------------------------------------------------------- server runner


def test_run_uvicorn_answers_as_soon_as_it_returns_and_stops_cleanly() -> None:
    """How long a start takes is a benchmark (benchmarks/harness_start.py), not a test."""
    backend = EchoBackend("plain")
    sockets_before = open_socket_count()
    handles = [run_uvicorn(backend) for _ in range(5)]
    try:
        ports = {h.port for h in handles}
        assert len(ports) == 5 and 0 not in ports
        for handle in handles:
            assert handle.url == f"http://127.0.0.1:{handle.port}"
            assert httpx.get(handle.url + "/").status_code == 200
    finally:
        for handle in handles:
            handle.stop()
    assert not any(h.alive for h in handles)
    assert backend.requests == 5
    assert poll(lambda: open_socket_count() <= sockets_before)
    with pytest.raises(httpx.ConnectError):
        httpx.get(handles[0].url)


def test_run_uvicorn_context_manager_and_keep_alive_timeout() -> None:
    backend = EchoBackend("ka")
    with run_uvicorn(backend, timeout_keep_alive=0.2) as handle, httpx.Client() as client:
        assert client.get(handle.url).status_code == 200
        assert handle.open_connections == 1
        # uvicorn closes the idle pooled connection after 0.2 s
        assert poll(lambda: handle.open_connections == 0, timeout=3.0)
    assert not handle.alive


def test_run_uvicorn_port_in_use_raises_without_leaking() -> None:
    with run_uvicorn(EchoBackend("first")) as first:
        with pytest.raises(RuntimeError, match="failed to start"):
            run_uvicorn(EchoBackend("second"), port=first.port)
        assert httpx.get(first.url).json()["backend"] == "first"
    assert not [t for t in threading.enumerate() if t.name == "harness-uvicorn-second"]


# ---------------------------------------------------------------------- echo backend


def test_echo_returns_json_and_counts(echo_factory: EchoFactory) -> None:
    backend = echo_factory("alpha")
    body = b"x" * 1000
    with httpx.Client(base_url=backend.url) as client:
        get = client.get("/items?a=1", headers={"x-request-id": "rid-1"})
        post = client.post("/pay", content=body, headers={"idempotency-key": "k-1"})
        client.post("/pay", content=body, headers={"idempotency-key": "k-1"})
    assert get.status_code == 200
    assert get.headers["x-backend"] == "alpha"
    data = get.json()
    assert data["backend"] == "alpha"
    assert (data["path"], data["method"], data["query"]) == ("/items", "GET", "a=1")
    assert data["headers"]["x-request-id"] == "rid-1"
    assert data["body_len"] == 0
    sha = hashlib.sha256(body).hexdigest()
    assert post.json()["body_sha256"] == sha and post.json()["body_len"] == 1000
    assert backend.requests == 3
    assert backend.by_path == {"/items": 1, "/pay": 2}
    assert backend.side_effects == {"rid-1": 1, "k-1": 2}
    assert backend.bodies[1:] == [(1000, sha), (1000, sha)]
    assert backend.last_headers["idempotency-key"] == "k-1"
    assert [r.method for r in backend.records] == ["GET", "POST", "POST"]
    assert backend.in_flight == 0 and backend.max_in_flight == 1


def test_echo_head_and_no_content(echo_factory: EchoFactory) -> None:
    backend = echo_factory()
    backend.set_status(204, path="/empty")
    assert httpx.head(backend.url + "/x").status_code == 200
    empty = httpx.delete(backend.url + "/empty")
    assert empty.status_code == 204 and empty.content == b""


def test_echo_status_per_path_headers_and_times(echo_factory: EchoFactory) -> None:
    backend = echo_factory()
    backend.set_status(503, path="/flaky", headers={"retry-after": "1"}, times=2)
    backend.set_status(404, path="/flaky/gone")
    with httpx.Client(base_url=backend.url) as client:
        first = client.get("/flaky/x")
        assert first.status_code == 503
        assert first.headers["retry-after"] == "1"
        assert first.json()["backend"] == backend.name
        assert client.get("/flaky").status_code == 503
        assert client.get("/flaky").status_code == 200  # times=2 used up
        assert client.get("/flaky/gone/1").status_code == 404  # longest prefix wins
        assert client.get("/other").status_code == 200
        backend.set_status(500)
        assert client.get("/other").status_code == 500
        backend.reset()
        assert client.get("/other").status_code == 200
    assert backend.requests == 7


def test_echo_delay(echo_factory: EchoFactory) -> None:
    backend = echo_factory()
    backend.set_delay(0.3, path="/slow")
    started = time.monotonic()
    assert httpx.get(backend.url + "/slow").status_code == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert httpx.get(backend.url + "/fast").status_code == 200
    assert time.monotonic() - started < 0.3
    assert backend.disconnects == 0


def test_echo_hang_sees_client_disconnect(echo_factory: EchoFactory) -> None:
    backend = echo_factory()
    backend.set_behavior("hang")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(backend.url + "/h", timeout=0.2)
    assert backend.wait_for_disconnects(1, timeout=5)
    assert backend.requests == 1 and backend.disconnects == 1
    assert backend.wait_for_idle()


def test_echo_delay_loser_disconnect_counted(echo_factory: EchoFactory) -> None:
    backend = echo_factory()
    backend.set_delay(5.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(backend.url, timeout=0.2)
    assert backend.wait_for_disconnects(1, timeout=5)
    assert backend.in_flight == 0 or backend.wait_for_idle()


def test_echo_hang_released_by_server_stop() -> None:
    backend = EchoBackend("stuck")
    handle = backend.serve(shutdown_grace=0.05)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            httpx.get(handle.url, timeout=10)
        except httpx.HTTPError as exc:
            errors.append(exc)

    backend.set_behavior("hang")
    thread = threading.Thread(target=call)
    thread.start()
    assert backend.wait_for_requests(1)
    handle.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], BROKEN)
    assert backend.disconnects == 1


def test_echo_reset_before_headers(echo_factory: EchoFactory) -> None:
    backend = echo_factory()
    backend.set_behavior("reset_before_headers", path="/pay", times=1)
    with pytest.raises(BROKEN):
        httpx.post(backend.url + "/pay", content=b"abc", headers={"x-request-id": "r1"})
    assert backend.side_effects["r1"] == 1  # request was fully received
    assert httpx.post(backend.url + "/pay", content=b"abc").status_code == 200


@pytest.mark.parametrize(
    ("kind", "error"),
    [("error_mid_body", httpx.RemoteProtocolError), ("reset_mid_body", BROKEN)],
)
def test_echo_mid_body_failures(
    echo_factory: EchoFactory, kind: str, error: type[Exception] | tuple[type[Exception], ...]
) -> None:
    backend = echo_factory()
    backend.set_behavior(kind)  # type: ignore[arg-type]
    with httpx.Client() as client, client.stream("GET", backend.url + "/m") as response:
        assert response.status_code == 200
        assert response.headers["x-backend"] == backend.name
        with pytest.raises(error):
            response.read()
    assert backend.requests == 1
    assert backend.wait_for_idle()


@pytest.mark.anyio
async def test_echo_async_concurrency_counters(echo_factory: EchoFactory) -> None:
    backend = echo_factory()
    backend.set_delay(0.3)
    results: list[int] = []

    async with httpx.AsyncClient(base_url=backend.url) as client:

        async def one(i: int) -> None:
            response = await client.get(f"/c/{i}", headers={"x-request-id": f"id-{i}"})
            results.append(response.status_code)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
    assert results == [200] * 5
    assert backend.max_in_flight == 5 and backend.in_flight == 0
    assert sorted(backend.side_effects) == [f"id-{i}" for i in range(5)]


def test_echo_rejects_unknown_behaviour() -> None:
    with pytest.raises(ValueError):
        EchoBackend("x").set_behavior("explode")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- raw server


def test_raw_ok_status_and_chunked(raw_server_factory: RawFactory) -> None:
    raw = raw_server_factory("r")
    with httpx.Client(base_url=raw.url) as client:
        ok = client.post("/a?x=1", content=b"hello", headers={"x-request-id": "q"})
        chunked = client.post("/b", content=iter([b"ab", b"cd"]))
        raw.set_mode("status", status=503, headers={"retry-after": "0"})
        unavailable = client.get("/c")
    assert ok.status_code == 200 and ok.headers["x-backend"] == "r"
    assert ok.json()["path"] == "/a" and ok.json()["body_len"] == 5
    assert chunked.json()["body_sha256"] == hashlib.sha256(b"abcd").hexdigest()
    assert unavailable.status_code == 503 and unavailable.headers["retry-after"] == "0"
    assert raw.requests == 3 and raw.connections == 1  # keep-alive reused
    assert raw.side_effects == {"q": 1}


def test_raw_reset_before_headers(raw_server_factory: RawFactory) -> None:
    raw = raw_server_factory()
    raw.set_mode("reset_before_headers", times=1)
    with pytest.raises(BROKEN):
        httpx.post(raw.url + "/pay", content=b"{}", headers={"x-request-id": "p1"})
    assert raw.side_effects == {"p1": 1}
    assert httpx.get(raw.url).status_code == 200  # times=1 used up
    assert raw.requests == 2


def test_raw_close_before_read(raw_server_factory: RawFactory) -> None:
    raw = raw_server_factory()
    raw.set_mode("close_before_read")
    with pytest.raises(RST_AT_ACCEPT):
        httpx.post(raw.url, content=b"x")
    assert raw.wait_for_connections(1)
    assert raw.requests == 0


def test_raw_headers_then_reset(raw_server_factory: RawFactory) -> None:
    raw = raw_server_factory()
    raw.set_mode("headers_then_reset")
    with httpx.Client() as client, client.stream("GET", raw.url) as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == "1000"
        with pytest.raises(BROKEN):
            response.read()
    assert raw.requests == 1


def test_raw_close_on_reuse(raw_server_factory: RawFactory) -> None:
    raw = raw_server_factory()
    raw.set_mode("close_on_reuse")
    with httpx.Client(base_url=raw.url) as client:
        assert client.get("/1").status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/2")  # sent on the pooled connection, which the server drops
        assert client.get("/3").status_code == 200  # fresh connection
    assert raw.requests == 2 and raw.dropped_requests == 1 and raw.connections == 2


def test_raw_keepalive_close_after(raw_server_factory: RawFactory) -> None:
    raw = raw_server_factory()
    raw.set_mode("keepalive_close_after", idle=0.2)
    with httpx.Client(base_url=raw.url) as client:
        assert client.get("/").status_code == 200
        assert raw.active_connections == 1
        assert raw.wait_until(lambda s: s.active_connections == 0, timeout=3)
        assert client.get("/").status_code == 200  # httpx notices the closed socket
    assert raw.connections == 2


# ---------------------------------------------------------------------- chaos proxy


def test_chaos_pass_and_refuse(echo_factory: EchoFactory, chaos_factory: ChaosFactory) -> None:
    backend = echo_factory("behind")
    proxy = chaos_factory(backend.url)
    assert httpx.get(proxy.url + "/p").json()["backend"] == "behind"
    proxy.set_mode("refuse")
    with pytest.raises(httpx.ConnectError):
        httpx.get(proxy.url)
    proxy.set_mode("pass")  # re-bound on the same port
    assert httpx.get(proxy.url).status_code == 200
    proxy.set_mode("refuse", how="rst")
    with pytest.raises(RST_AT_ACCEPT):
        httpx.get(proxy.url)
    assert proxy.resets == 1
    assert backend.requests == 2
    assert proxy.bytes_up > 0 and proxy.bytes_down > 0


def test_chaos_blackhole(echo_factory: EchoFactory, chaos_factory: ChaosFactory) -> None:
    backend = echo_factory()
    proxy = chaos_factory(backend.url)
    proxy.set_mode("blackhole")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(proxy.url, timeout=httpx.Timeout(0.3))
    assert proxy.connections == 1
    assert backend.requests == 0
    proxy.set_mode("pass", kill_existing=True)
    assert httpx.get(proxy.url).status_code == 200


def test_chaos_reset_after_and_half_close(
    echo_factory: EchoFactory, chaos_factory: ChaosFactory
) -> None:
    backend = echo_factory()
    proxy = chaos_factory(backend.url)
    proxy.set_mode("reset_after", n=200)
    with pytest.raises(BROKEN):
        httpx.get(proxy.url + "/r")
    assert backend.wait_for_requests(1)
    proxy.set_mode("half_close")
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(proxy.url + "/h")
    assert proxy.wait_until(lambda p: p.active == 0)
    assert proxy.resets == 1


def test_chaos_delay_and_kill_existing(
    echo_factory: EchoFactory, chaos_factory: ChaosFactory
) -> None:
    backend = echo_factory()
    proxy = chaos_factory(backend.url)
    with httpx.Client(base_url=proxy.url) as client:
        assert client.get("/").status_code == 200
        proxy.set_mode("delay", seconds=0.2, direction="downstream")
        started = time.monotonic()
        assert client.get("/").status_code == 200
        assert time.monotonic() - started >= 0.2
        proxy.set_mode("pass", kill_existing=True)
        assert proxy.wait_until(lambda p: p.active == 0)
        assert client.get("/").status_code == 200  # pool notices the dead connection
    assert proxy.connections == 2


def test_chaos_close_releases_everything(
    echo_factory: EchoFactory,
) -> None:
    backend = echo_factory()
    sockets_before = open_socket_count()
    proxy = ChaosProxy(backend.url, name="closing").start()
    proxy.set_mode("blackhole")
    client = httpx.Client(timeout=httpx.Timeout(5.0))
    done = threading.Event()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.get(proxy.url)
        except httpx.HTTPError as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=call)
    thread.start()
    assert proxy.wait_until(lambda p: p.connections == 1)
    proxy.close()
    assert done.wait(5)
    thread.join(5)
    client.close()
    assert not proxy.alive
    assert len(errors) == 1 and isinstance(errors[0], BROKEN)
    assert poll(lambda: open_socket_count() <= sockets_before)


def test_chaos_upstream_reset_and_bandwidth(
    echo_factory: EchoFactory, chaos_factory: ChaosFactory
) -> None:
    backend = echo_factory()
    proxy = chaos_factory(("127.0.0.1", backend.port))
    proxy.set_mode("reset_after", n=10, direction="upstream")
    with pytest.raises((httpx.WriteError, *BROKEN)):
        httpx.post(proxy.url, content=b"z" * 100_000)
    assert backend.requests == 0  # the request never fully reached the backend
    proxy.set_mode("bandwidth", rate=20_000, direction="downstream")
    started = time.monotonic()
    response = httpx.post(proxy.url, content=b"z" * 100)
    assert response.status_code == 200 and response.json()["body_len"] == 100
    # ~500 response bytes (headers + JSON) at 20 kB/s take >= ~20 ms
    assert time.monotonic() - started >= 0.02
    assert backend.requests == 1
