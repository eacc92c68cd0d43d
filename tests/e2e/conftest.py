"""End-to-end fixtures: every behaviour case runs through both the sync and the async client.

``caller`` is parametrized over ``sync`` and ``async``; ``caller.bind(mesh)`` returns a
:class:`Caller` whose methods are plain blocking calls in both modes (the async client runs on
a private event loop in a background thread), so one test body exercises both drivers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from harness.processes import Traffic

import meshlib


class Caller:
    """Blocking facade over ``mesh.client()`` or ``mesh.async_client()``."""

    def __init__(self, mesh: meshlib.Mesh, mode: str, **client_kwargs: Any) -> None:
        self.mesh = mesh
        self.mode = mode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        if mode == "sync":
            self._client: Any = mesh.client(**client_kwargs)
        else:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name="e2e-async-caller", daemon=True
            )
            self._thread.start()

            async def make() -> httpx.AsyncClient:
                return mesh.async_client(**client_kwargs)

            self._client = self._run(make())

    def _run(self, coro: Any, timeout: float = 60) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Send one request and read its body. Raises what the client raises."""
        if self.mode == "sync":
            return self._client.request(method, url, **kwargs)  # type: ignore[no-any-return]

        async def go() -> httpx.Response:
            response: httpx.Response = await self._client.request(method, url, **kwargs)
            await response.aread()
            return response

        return self._run(go())  # type: ignore[no-any-return]

    def stream(self, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, list[bytes]]:
        """``client.stream``: the response and the chunks read from it one by one (the
        response is closed). Raises what the client raises, while reading included."""
        if self.mode == "sync":
            with self._client.stream(method, url, **kwargs) as response:
                return response, list(response.iter_raw())

        async def go() -> tuple[httpx.Response, list[bytes]]:
            async with self._client.stream(method, url, **kwargs) as response:
                return response, [chunk async for chunk in response.aiter_raw()]

        return self._run(go())  # type: ignore[no-any-return]

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def outcome(self, method: str, url: str, **kwargs: Any) -> httpx.Response | Exception:
        """Like :meth:`request` but returns the exception instead of raising it."""
        try:
            return self.request(method, url, **kwargs)
        except Exception as exc:
            return exc

    def many(
        self, n: int, method: str, url: str, *, concurrency: int = 1, **kwargs: Any
    ) -> list[httpx.Response | Exception]:
        """``n`` calls with ``concurrency`` in flight; results in completion order."""
        if concurrency <= 1:
            return [self.outcome(method, url, **kwargs) for _ in range(n)]
        if self.mode == "sync":
            with ThreadPoolExecutor(concurrency) as pool:
                return list(pool.map(lambda _: self.outcome(method, url, **kwargs), range(n)))

        async def go() -> list[httpx.Response | Exception]:
            sem = asyncio.Semaphore(concurrency)

            async def one() -> httpx.Response | Exception:
                async with sem:
                    try:
                        response: httpx.Response = await self._client.request(method, url, **kwargs)
                        await response.aread()
                        return response
                    except Exception as exc:
                        return exc

            return list(await asyncio.gather(*(one() for _ in range(n))))

        return self._run(go(), timeout=300)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.mode == "sync":
            self._client.close()
            return
        assert self._loop is not None and self._thread is not None
        self._run(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


class CallerFactory:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._made: list[Caller] = []

    def bind(self, mesh: meshlib.Mesh, **client_kwargs: Any) -> Caller:
        caller = Caller(mesh, self.mode, **client_kwargs)
        self._made.append(caller)
        return caller

    def close(self) -> None:
        for caller in self._made:
            caller.close()


@pytest.fixture(params=["sync", "async"])
def caller(request: pytest.FixtureRequest) -> Iterator[CallerFactory]:
    """``caller.bind(mesh)`` → a blocking Caller over the sync or the async client."""
    factory = CallerFactory(request.param)
    yield factory
    factory.close()


@pytest.fixture
def make_mesh() -> Iterator[Callable[..., meshlib.Mesh]]:
    """``make_mesh(policy_text, **Mesh kwargs)`` → a Mesh (service "tester", seed 7 unless
    given) closed at teardown. Metrics go to a private registry per mesh."""
    from prometheus_client import CollectorRegistry

    made: list[meshlib.Mesh] = []

    def make(text: str, **kwargs: Any) -> meshlib.Mesh:
        kwargs.setdefault("service", "tester")
        kwargs.setdefault("seed", 7)
        kwargs.setdefault("registry", CollectorRegistry())
        mesh = meshlib.Mesh.from_text(text, **kwargs)
        made.append(mesh)
        return mesh

    yield make
    for mesh in made:
        mesh.close()


def service_yaml(name: str, ports: list[int], namespace: str = "default") -> str:
    """A Service document with one endpoint per port on 127.0.0.1."""
    endpoints = "\n".join(f"    - address: 127.0.0.1:{p}" for p in ports)
    return (
        "apiVersion: meshlib/v1\nkind: Service\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec:\n  endpoints:\n{endpoints}\n"
    )


@pytest.fixture
def traffic() -> Iterator[Callable[[meshlib.Mesh], Traffic]]:
    """Start steady mesh calls from a mesh (``traffic(mesh)``); each is stopped afterwards."""
    running: list[Traffic] = []

    def start(mesh: meshlib.Mesh) -> Traffic:
        running.append(Traffic(mesh))
        return running[-1]

    yield start
    for each in running:
        each.stop()
