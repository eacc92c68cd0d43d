"""Shared fixtures for real-socket tests: echo backends, raw HTTP servers and chaos proxies.

Import the harness as ``from harness import EchoBackend, ChaosProxy, RawServer, run_uvicorn``
(this conftest puts ``tests/`` on ``sys.path``). Every object a factory creates is
stopped at teardown and its background thread must be gone, or the test errors.
Socket tests should carry ``pytestmark = pytest.mark.timeout(30)`` (the global
pytest-timeout is 120 s).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from etcd_cluster import ETCD, EtcdCluster  # noqa: E402
from harness import ChaosProxy, EchoBackend, RawServer  # noqa: E402
from harness.leaks import assert_threads_stopped  # noqa: E402


def _teardown(objects: list[Any], stop: Callable[[Any], None]) -> None:
    """Stop every harness object (even if one fails), then check no thread survived."""
    names: list[str] = []
    errors: list[BaseException] = []
    for obj in reversed(objects):
        names.append(_thread_name(obj))
        try:
            stop(obj)
        except Exception as exc:
            errors.append(exc)
    if errors:
        raise errors[0]
    assert_threads_stopped(names)


def _thread_name(obj: Any) -> str:
    server = getattr(obj, "server", None)
    if server is not None and hasattr(server, "thread_name"):
        return str(server.thread_name)
    return str(getattr(obj, "thread_name", ""))


@pytest.fixture
def echo_factory() -> Iterator[Callable[..., EchoBackend]]:
    """``echo_factory(name, **run_uvicorn_kwargs)`` -> a served :class:`EchoBackend`."""
    created: list[EchoBackend] = []

    def make(name: str | None = None, **kwargs: Any) -> EchoBackend:
        backend = EchoBackend(name or f"echo{len(created)}")
        backend.serve(**kwargs)
        created.append(backend)
        return backend

    yield make
    _teardown(created, lambda b: b.stop())


@pytest.fixture
def raw_server_factory() -> Iterator[Callable[..., RawServer]]:
    """``raw_server_factory(name)`` -> a started :class:`RawServer`."""
    created: list[RawServer] = []

    def make(name: str | None = None, **kwargs: Any) -> RawServer:
        server = RawServer(name or f"raw{len(created)}", **kwargs).start()
        created.append(server)
        return server

    yield make
    _teardown(created, lambda s: s.stop())


@pytest.fixture
def chaos_factory() -> Iterator[Callable[..., ChaosProxy]]:
    """``chaos_factory(upstream_url_or_host_port, name=...)`` -> a started :class:`ChaosProxy`."""
    created: list[ChaosProxy] = []

    def make(upstream: str | tuple[str, int], **kwargs: Any) -> ChaosProxy:
        kwargs.setdefault("name", f"chaos{len(created)}")
        proxy = ChaosProxy(upstream, **kwargs).start()
        created.append(proxy)
        return proxy

    yield make
    _teardown(created, lambda p: p.close())


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A one-member etcd on a free loopback port, in the test's temporary directory."""
    if ETCD is None:
        pytest.skip("etcd not installed: apt-get install etcd-server (CI installs it)")
    cluster = EtcdCluster.start(tmp_path / "etcd", 1)
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A three-member etcd cluster on free loopback ports, in the test's temporary directory."""
    if ETCD is None:
        pytest.skip("etcd not installed: apt-get install etcd-server (CI installs it)")
    cluster = EtcdCluster.start(tmp_path / "etcd3", 3)
    yield cluster
    cluster.stop()
