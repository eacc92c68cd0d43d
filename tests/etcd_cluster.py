"""Real etcd for tests: single nodes and loopback clusters of Debian's ``etcd`` (3.4) on free
ports in a temporary directory, each stopped afterwards.

Import as ``from etcd_cluster import EtcdCluster, needs_etcd`` (tests/ is on ``sys.path``); the
``etcd`` and ``etcd3`` fixtures in tests/conftest.py wrap :meth:`EtcdCluster.start`.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ETCD = shutil.which("etcd")
needs_etcd = pytest.mark.skipif(
    ETCD is None, reason="etcd not installed: apt-get install etcd-server (CI installs it)"
)

#: How long a cluster may take to accept a write (a node starts in about 1 s on loopback).
START_WITHIN = 20.0
#: How long a stopped process may take to exit after SIGTERM before it gets SIGKILL.
STOP_WITHIN = 5.0


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together so none is handed out twice)."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _post(url: str, body: dict[str, object], timeout: float = 1.0) -> dict[str, object]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


@dataclass
class EtcdNode:
    """One etcd member: its URLs, its data dir and (while running) its process."""

    name: str
    client_url: str
    peer_url: str
    data_dir: Path
    initial_cluster: str
    process: subprocess.Popen[bytes] | None = None
    started: int = field(default=0)

    def start(self) -> None:
        """(Re)start the member with the same data dir (a restart rejoins its cluster)."""
        assert ETCD is not None, "etcd is not installed"
        assert self.process is None or self.process.poll() is not None, f"{self.name} is running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.started += 1
        log = self.data_dir.parent / f"{self.name}.{self.started}.log"
        self.process = subprocess.Popen(
            [
                ETCD,
                "--name", self.name,
                "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.client_url,
                "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.initial_cluster,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", self.data_dir.parent.name,
                "--heartbeat-interval", "50",
                "--election-timeout", "500",
                "--auto-compaction-mode", "revision",
                "--auto-compaction-retention", "1000",
                # Progress notifications well within a store's watch_bound, so a resumed
                # quiet watch starts from a recent revision (tests use a short bound).
                "--experimental-watch-progress-notify-interval", "500ms",
                "--logger", "zap",
                "--log-outputs", str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` and wait for the process to end (SIGKILL if it outlives STOP_WITHIN)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(STOP_WITHIN)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_WITHIN)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def member_id(self) -> str:
        """This member's id, from its own status."""
        status = _post(self.client_url + "/v3/maintenance/status", {})
        header = status["header"]
        assert isinstance(header, dict)
        return str(header["member_id"])


class EtcdCluster:
    """``size`` etcd members on loopback, started in ``base``; :meth:`stop` ends them all."""

    def __init__(self, nodes: list[EtcdNode]) -> None:
        self.nodes = nodes

    @property
    def endpoints(self) -> list[str]:
        return [node.client_url for node in self.nodes]

    @classmethod
    def start(cls, base: Path, size: int = 1, *, prefix: str = "etcd") -> EtcdCluster:
        """Start the members and return once a write through each running member succeeds."""
        ports = _free_ports(2 * size)
        names = [f"{prefix}{n}" for n in range(size)]
        peers = [f"http://127.0.0.1:{ports[2 * n + 1]}" for n in range(size)]
        initial = ",".join(f"{name}={peer}" for name, peer in zip(names, peers, strict=True))
        nodes = [
            EtcdNode(
                name=names[n],
                client_url=f"http://127.0.0.1:{ports[2 * n]}",
                peer_url=peers[n],
                data_dir=base / f"{names[n]}.data",
                initial_cluster=initial,
            )
            for n in range(size)
        ]
        cluster = cls(nodes)
        try:
            for node in nodes:
                node.start()
            cluster.wait_writable()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def wait_writable(self, within: float = START_WITHIN) -> None:
        """Wait until a write through every running member succeeds (bounded). The write deletes
        an absent key: it goes through Raft like any write but leaves the store at revision 1,
        so a store on a fresh cluster starts empty at revision 0."""
        key = base64.b64encode(b"\0etcd-cluster-ready").decode()
        deadline = time.monotonic() + within
        for node in self.nodes:
            if not node.running:
                continue
            while True:
                if not node.running:
                    raise RuntimeError(f"{node.name} exited while starting; see its log in "
                                       f"{node.data_dir.parent}")  # fmt: skip
                try:
                    _post(node.client_url + "/v3/kv/deleterange", {"key": key})
                    break
                except (OSError, urllib.error.URLError):
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"etcd member {node.name} took no write within {within} s"
                        ) from None
                    time.sleep(0.05)

    def leader(self) -> EtcdNode:
        """The member the running members agree leads (asked via /v3/maintenance/status)."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                status = _post(node.client_url + "/v3/maintenance/status", {})
            except (OSError, urllib.error.URLError):
                continue
            leader = str(status.get("leader", ""))
            for candidate in self.nodes:
                if candidate.running and candidate.member_id() == leader:
                    return candidate
        raise RuntimeError("no running etcd member knows a leader")

    def stop(self) -> None:
        """Stop every member: SIGTERM, then SIGKILL if it lingers."""
        for node in self.nodes:
            node.kill(signal.SIGTERM)
