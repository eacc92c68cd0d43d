"""SVID rotation (SEC-5): renewal time at half-life with jitter, and leaf rotation of both the
client and the server under steady load, with real handshakes and zero failed calls."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.identity import CertificateAuthority, SpiffeID
from meshlib.identity.rotation import RotationWatcher, renewal_time
from meshlib.identity.tls import SVIDSource

from .conftest import CLIENT_ID, PKI, TD, mesh_text, write_pair

pytestmark = pytest.mark.timeout(60)

REVIEWS_ID = SpiffeID.for_workload(TD, "default", "reviews")
SHORT = dt.timedelta(seconds=4)
POLL = 0.05


# --- renewal time (pure) ------------------------------------------------------------------------


def test_renewal_time_is_half_life_within_ten_percent_jitter() -> None:
    rng = random.Random(7)
    times = [renewal_time(1000.0, 2000.0, rng) for _ in range(2000)]
    assert min(times) >= 1400.0 and max(times) <= 1600.0
    # uniform(-0.1, 0.1) x 1000: mean 1500, sd 57.7; 5 sigma of the mean of 2000 draws ~ 6.5
    assert abs(statistics.fmean(times) - 1500.0) < 6.5
    assert max(times) - min(times) > 150.0  # really spread: workloads do not renew together


def test_renewal_time_is_reproducible_with_a_seeded_rng() -> None:
    first = [renewal_time(0.0, 86400.0, random.Random(3)) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    assert renewal_time(0.0, 86400.0, random.Random(4)) != first[0]
    assert renewal_time(0.0, 100.0, random.Random(1), jitter=0.0) == 50.0
    with pytest.raises(ValueError):
        renewal_time(0.0, 100.0, random.Random(1), fraction=0.95, jitter=0.1)


def test_watcher_renew_at_follows_the_loaded_certificate(pki: PKI) -> None:
    source = SVIDSource(pki.client_dir)
    seen: list[x509.Certificate] = []
    watcher = RotationWatcher(
        source, rng=random.Random(7), on_reload=lambda m: seen.append(m.certificate)
    )
    status = watcher.status
    cert = source.material.certificate
    assert seen == [cert]  # notified at load (the expiry metric is set from it)
    assert status.identity == str(CLIENT_ID) and status.serial == cert.serial_number
    assert status.expires_at == cert.not_valid_after_utc.timestamp()
    lifetime = status.expires_at - status.not_before
    assert 0.4 * lifetime <= status.renew_at - status.not_before <= 0.6 * lifetime
    assert status.last_reload is None and status.last_error is None


def test_overdue_renewal_warns_once_per_interval(
    pki: PKI, caplog: pytest.LogCaptureFixture
) -> None:
    source = SVIDSource(pki.client_dir)
    wall = [0.0]
    mono = [0.0]
    watcher = RotationWatcher(
        source,
        clock=lambda: wall[0],
        monotonic=lambda: mono[0],
        rng=random.Random(1),
        warn_interval=60.0,
    )
    caplog.set_level(logging.WARNING, logger="meshlib.identity.rotation")
    wall[0] = watcher.status.renew_at - 1.0
    watcher._warn_if_overdue()
    assert caplog.records == []  # not due yet
    wall[0] = watcher.status.renew_at + 1.0
    for _ in range(5):
        watcher._warn_if_overdue()
    assert len(caplog.records) == 1
    assert "no renewal found in" in caplog.records[0].getMessage()
    assert str(pki.client_dir) in caplog.records[0].getMessage()
    mono[0] = 61.0
    watcher._warn_if_overdue()
    assert len(caplog.records) == 2
    # a renewal resets the schedule: nothing to warn about until the new renew_at
    pki.ca.issue(CLIENT_ID).save(pki.client_dir)
    wall[0] = time.time()
    assert watcher.check() is True
    watcher._warn_if_overdue()
    assert len(caplog.records) == 2
    assert watcher.status.reloads == 1 and watcher.status.last_reload == wall[0]


# --- rotation under load, real handshakes -------------------------------------------------------


async def _echo_serials(scope: Any, receive: Any, send: Any) -> None:
    """Answers "<client leaf serial> <server leaf serial>" (hex) as seen by the server."""
    if scope["type"] != "http":
        return
    tls = scope["extensions"]["tls"]
    client = x509.load_pem_x509_certificate(tls["client_cert_chain"][0].encode())
    server = x509.load_pem_x509_certificate(tls["server_cert"].encode())
    body = f"{client.serial_number:x} {server.serial_number:x}".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


@dataclass
class Load:
    """Calls through the client mesh from background threads until stopped."""

    mesh: meshlib.Mesh
    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    fresh: list[tuple[str, str]] = field(default_factory=list)  # new connection per call
    fresh_async: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # one keep-alive connection
    failures: list[BaseException] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for target in (self._fresh, self._kept, self._fresh_async):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def _record(self, out: list[tuple[str, str]], text: str) -> None:
        client, server = text.split()
        out.append((client, server))

    def _fresh(self) -> None:
        while not self.stop.is_set():
            try:
                with self.mesh.client(timeout=5.0) as client:
                    response = client.get(self.url)
                    assert response.status_code == 200, response.text
                    self._record(self.fresh, response.text)
            except BaseException as exc:  # recorded, asserted by the test
                self.failures.append(exc)

    def _kept(self) -> None:
        with self.mesh.client(timeout=5.0) as client:
            while not self.stop.is_set():
                try:
                    response = client.get(self.url)
                    assert response.status_code == 200, response.text
                    self._record(self.kept, response.text)
                except BaseException as exc:
                    self.failures.append(exc)
                self.stop.wait(0.02)  # pacing (~50 req/s), not synchronisation

    def _fresh_async(self) -> None:
        async def main() -> None:
            while not self.stop.is_set():
                try:
                    async with self.mesh.async_client(timeout=5.0) as client:
                        response = await client.get(self.url)
                        assert response.status_code == 200, response.text
                        self._record(self.fresh_async, response.text)
                except BaseException as exc:
                    self.failures.append(exc)

        asyncio.run(main())

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def _wait(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # polling a condition with a deadline


def _serial(path: Path) -> str:
    return f"{x509.load_pem_x509_certificate((path / 'cert.pem').read_bytes()).serial_number:x}"


@dataclass
class Rig:
    pki: PKI
    server: Any
    client_mesh: meshlib.Mesh
    registry: CollectorRegistry
    server_registry: CollectorRegistry
    load: Load

    def wait_serving(self, client: str, server: str) -> None:
        """Wait until fresh connections (sync and async) show both serials."""
        want = (client, server)
        start_fresh, start_async = len(self.load.fresh), len(self.load.fresh_async)
        _wait(
            lambda: (
                want in self.load.fresh[start_fresh:]
                and want in self.load.fresh_async[start_async:]
            ),
            f"new connections presenting client {client} / server {server}",
        )


@pytest.fixture
def rig(pki: PKI) -> Iterator[Rig]:
    from meshlib.inbound.serving import serve

    server_dir = pki.ca.issue(REVIEWS_ID, ttl=SHORT).save(pki.root / "reviews")
    pki.ca.issue(CLIENT_ID, ttl=SHORT).save(pki.client_dir)
    server_registry = CollectorRegistry()
    server_mesh = meshlib.Mesh.from_text(
        mesh_text("strict"), service="reviews", seed=7, registry=server_registry
    )
    server = serve(
        _echo_serials,
        mesh=server_mesh,
        svid_dir=str(server_dir),
        svid_poll_interval=POLL,
        lifespan="off",
        timeout_keep_alive=30,
    )
    registry = CollectorRegistry()
    text = (
        mesh_text("strict")
        + "---\napiVersion: meshlib/v1\nkind: Service\n"
        + "metadata: {name: reviews, namespace: default}\n"
        + f'spec: {{endpoints: [{{address: "127.0.0.1:{server.port}"}}]}}\n'
    )
    client_mesh = meshlib.Mesh.from_text(
        text,
        service="web",
        seed=7,
        registry=registry,
        svid_dir=str(pki.client_dir),
        svid_poll_interval=POLL,
    )
    load = Load(client_mesh, "http://reviews/")
    rig = Rig(pki, server, client_mesh, registry, server_registry, load)
    try:
        yield rig
    finally:
        load.close()
        client_mesh.close()
        server.stop()
        server_mesh.close()


def _expiry(registry: CollectorRegistry, identity: SpiffeID) -> float | None:
    return registry.get_sample_value(
        "mesh_cert_expiry_timestamp_seconds", {"identity": str(identity)}
    )


def _not_after(directory: Path) -> float:
    cert = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
    return cert.not_valid_after_utc.timestamp()


def test_rotation_under_load_has_zero_failed_calls(rig: Rig) -> None:
    pki = rig.pki
    server_dir = rig.server.svid.directory
    rig.load.start()
    first = (_serial(pki.client_dir), _serial(server_dir))
    rig.wait_serving(*first)
    _wait(lambda: len(rig.load.kept) > 0, "a keep-alive call")
    kept_serials = rig.load.kept[0]
    assert _expiry(rig.registry, CLIENT_ID) == _not_after(pki.client_dir)
    assert _expiry(rig.server_registry, REVIEWS_ID) == _not_after(server_dir)

    for _ in range(3):
        # key first, then cert, then bundle (each os.replace'd): a reader between the first
        # two sees a mismatched pair, which is refused and retried at the next change.
        pki.ca.issue(REVIEWS_ID, ttl=SHORT).save(server_dir)
        pki.ca.issue(CLIENT_ID, ttl=SHORT).save(pki.client_dir)
        rig.wait_serving(_serial(pki.client_dir), _serial(server_dir))
        assert _expiry(rig.registry, CLIENT_ID) == _not_after(pki.client_dir)
        assert _expiry(rig.server_registry, REVIEWS_ID) == _not_after(server_dir)

    n = len(rig.load.kept)
    _wait(lambda: len(rig.load.kept) > n + 3, "more keep-alive calls")
    rig.load.close()
    assert rig.load.failures == []
    # the established keep-alive connection went on with the pair it was opened with
    assert set(rig.load.kept) == {kept_serials}
    client_status = rig.client_mesh.svid_status
    server_status = rig.server.svid_status
    assert client_status is not None and server_status is not None
    assert client_status.reloads >= 3 and server_status.reloads >= 3
    assert f"{client_status.serial:x}" == _serial(pki.client_dir)
    assert f"{server_status.serial:x}" == _serial(server_dir)
    assert client_status.last_error is None and server_status.last_error is None


def test_mismatched_pair_is_refused_and_the_old_one_keeps_serving(rig: Rig) -> None:
    pki = rig.pki
    server_dir = rig.server.svid.directory
    rig.load.start()
    before = (_serial(pki.client_dir), _serial(server_dir))
    rig.wait_serving(*before)
    expiry_before = _expiry(rig.server_registry, REVIEWS_ID)

    other_key = CertificateAuthority.create(TD).issue(REVIEWS_ID).key  # not the cert's key
    new = pki.ca.issue(REVIEWS_ID, ttl=SHORT)
    write_pair(server_dir, new.chain, other_key, new.bundle)
    _wait(
        lambda: (s := rig.server.svid_status) is not None and s.last_error is not None,
        "the server watcher to refuse the pair",
    )
    status = rig.server.svid_status
    assert status is not None and status.last_error is not None
    assert "does not match" in status.last_error and status.failures >= 1
    assert f"{status.serial:x}" == before[1]
    rig.wait_serving(*before)  # still the old pair, and still handshaking fine
    assert _expiry(rig.server_registry, REVIEWS_ID) == expiry_before

    # the same on the client side
    new_client = pki.ca.issue(CLIENT_ID, ttl=SHORT)
    write_pair(pki.client_dir, new_client.chain, other_key, new_client.bundle)
    _wait(
        lambda: (s := rig.client_mesh.svid_status) is not None and s.last_error is not None,
        "the client watcher to refuse the pair",
    )
    rig.wait_serving(*before)

    # a good pair afterwards is picked up, and the error clears
    pki.ca.issue(REVIEWS_ID, ttl=SHORT).save(server_dir)
    pki.ca.issue(CLIENT_ID, ttl=SHORT).save(pki.client_dir)
    rig.wait_serving(_serial(pki.client_dir), _serial(server_dir))
    _wait(
        lambda: (
            rig.server.svid_status.last_error is None
            and rig.client_mesh.svid_status.last_error is None
        ),  # type: ignore[union-attr]
        "errors to clear",
    )
    rig.load.close()
    assert rig.load.failures == []
    assert _expiry(rig.server_registry, REVIEWS_ID) == _not_after(server_dir)


def test_watcher_off_and_no_svid_have_no_status(pki: PKI) -> None:
    mesh = meshlib.Mesh.from_text(
        mesh_text("strict"),
        service="web",
        registry=CollectorRegistry(),
        svid_dir=str(pki.client_dir),
        svid_poll_interval=None,
    )
    plain = meshlib.Mesh.from_text(mesh_text("strict"), service="web", registry=CollectorRegistry())
    try:
        assert mesh.svid is not None and mesh.svid_status is None
        assert plain.svid_status is None
    finally:
        mesh.close()
        plain.close()
