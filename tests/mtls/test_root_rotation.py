"""Root CA rotation with overlap under continuous traffic (SEC-7): two real mTLS services
(``meshlib.serve`` and a client ``Mesh``), both SVID directories watched, bundles v1 {R1} →
v2 {R1, R2} (sequence 2) → every leaf re-issued under R2 → v3 {R2} (sequence 3), with zero
failed calls; a premature v3 refused by the pre-flight with traffic still flowing; a stale
bundle ignored."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.identity import CAError
from meshlib.identity.bundle import TrustBundle, root_label
from meshlib.identity.cadir import CADirectory
from meshlib.identity.tls import SVIDSource

from .conftest import CLIENT_ID, TD, mesh_text
from .test_rotation import POLL, REVIEWS_ID, Load, _echo_serials, _serial, _wait

pytestmark = pytest.mark.timeout(60)


@dataclass
class RootRig:
    cadir: CADirectory
    server: Any
    server_dir: Path
    client_dir: Path
    client_mesh: meshlib.Mesh
    load: Load

    @property
    def sources(self) -> tuple[SVIDSource, SVIDSource]:
        assert self.server.svid is not None and self.client_mesh.svid is not None
        return self.server.svid, self.client_mesh.svid

    def publish(self, bundle: TrustBundle, *dirs: Path) -> None:
        for d in dirs or (self.server_dir, self.client_dir):
            _replace(d / "bundle.pem", bundle.to_pem())

    def wait_sequence(self, sequence: int) -> None:
        _wait(
            lambda: all(s.bundle_sequence == sequence for s in self.sources),
            f"both workloads to load bundle sequence {sequence}",
        )

    def wait_serving(self) -> None:
        """Wait until new connections (sync and async) show the current serials on disk."""
        want = (_serial(self.client_dir), _serial(self.server_dir))
        start_fresh, start_async = len(self.load.fresh), len(self.load.fresh_async)
        _wait(
            lambda: (
                want in self.load.fresh[start_fresh:]
                and want in self.load.fresh_async[start_async:]
            ),
            f"new connections presenting client {want[0]} / server {want[1]}",
        )


def _replace(path: Path, data: bytes) -> None:
    """Write like a distribution agent does: a temporary file, then rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[RootRig]:
    from meshlib.inbound.serving import serve

    cadir = CADirectory(tmp_path / "ca")
    cadir.init(TD)
    server_dir, client_dir = tmp_path / "reviews", tmp_path / "web"
    cadir.issue(REVIEWS_ID, out=server_dir)
    cadir.issue(CLIENT_ID, out=client_dir)
    server_mesh = meshlib.Mesh.from_text(
        mesh_text("strict"), service="reviews", seed=7, registry=CollectorRegistry()
    )
    server = serve(
        _echo_serials,
        mesh=server_mesh,
        svid_dir=str(server_dir),
        svid_poll_interval=POLL,
        lifespan="off",
        timeout_keep_alive=30,
    )
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
        registry=CollectorRegistry(),
        svid_dir=str(client_dir),
        svid_poll_interval=POLL,
    )
    rig = RootRig(
        cadir, server, server_dir, client_dir, client_mesh, Load(client_mesh, "http://reviews/")
    )
    try:
        yield rig
    finally:
        rig.load.close()
        client_mesh.close()
        server.stop()
        server_mesh.close()


def test_root_rotation_v1_v2_v3_under_load_has_zero_failed_calls(rig: RootRig) -> None:
    """SEC-7: zero failures across v1 → v2 → re-issue → v3 with continuous traffic."""
    cadir = rig.cadir
    r1 = cadir.current().certificate
    old_client = (
        (rig.client_dir / "cert.pem").read_bytes(),
        (rig.client_dir / "key.pem").read_bytes(),
    )
    rig.load.start()
    rig.wait_serving()  # v1 {R1}
    assert all(s.bundle_sequence == 1 for s in rig.sources)

    new_root, v2 = cadir.rotate()
    rig.publish(v2)
    rig.wait_sequence(2)
    rig.wait_serving()  # R1 leaves, both roots trusted
    r2 = new_root.certificate

    # re-issue every leaf under R2, the server first: for a while the two sides are on
    # different roots, which v2 trusts both of
    cadir.issue(REVIEWS_ID, out=rig.server_dir)
    rig.wait_serving()
    cadir.issue(CLIENT_ID, out=rig.client_dir)
    rig.wait_serving()

    v3 = cadir.export_bundle(rig.server_dir / "bundle.pem", drop_old=True)
    assert v3 == TrustBundle((r2,), 3)
    rig.publish(v3, rig.client_dir)
    rig.wait_sequence(3)
    rig.wait_serving()  # new connections after v3, on R2 only
    n = len(rig.load.kept)
    _wait(lambda: len(rig.load.kept) > n + 3, "more keep-alive calls")
    rig.load.close()

    assert rig.load.failures == []
    for source in rig.sources:
        assert source.bundle == (r2,) and source.last_error is None
        assert source.material.certificate.issuer == r2.subject
    status = rig.server.svid_status
    assert status is not None and status.failures == 0

    # after v3 a leaf still on R1 is refused by the server (its in-memory re-check uses the
    # bundle {R2}; OpenSSL's store cannot forget R1)
    legacy = rig.client_dir.parent / "legacy"
    legacy.mkdir()
    (legacy / "cert.pem").write_bytes(old_client[0])
    (legacy / "key.pem").write_bytes(old_client[1])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=v3.to_pem().decode())
    ctx.load_cert_chain(legacy / "cert.pem", legacy / "key.pem")
    with httpx.Client(verify=ctx, timeout=5.0) as client, pytest.raises(httpx.TransportError):
        client.get(rig.server.url)
    assert root_label(r1) != root_label(r2)


def test_premature_v3_is_refused_by_the_pre_flight_and_traffic_continues(
    rig: RootRig,
) -> None:
    """SEC-7 variant: v3 {R2} published while the client's leaf is still on R1. The CA refuses
    to drop R1; forced through, the client's watcher refuses the bundle ("leaf still chained to
    R1 which the new bundle drops"), keeps its last good context, and calls keep working.
    Then a stale bundle (sequence 1) is ignored."""
    cadir = rig.cadir
    r1 = cadir.current().certificate
    rig.load.start()
    rig.wait_serving()
    _, v2 = cadir.rotate()
    rig.publish(v2)
    rig.wait_sequence(2)
    cadir.issue(REVIEWS_ID, out=rig.server_dir)  # only the server moves to R2
    rig.wait_serving()

    with pytest.raises(CAError, match=f"{CLIENT_ID}"):
        cadir.drop_old()
    v3 = cadir.drop_old(force=True)
    rig.publish(v3, rig.client_dir)
    client = rig.client_mesh
    _wait(
        lambda: (s := client.svid_status) is not None and s.last_error is not None,
        "the client watcher to refuse v3",
    )
    status = client.svid_status
    assert status is not None and status.last_error is not None
    assert f"still chained to {root_label(r1)} which the new bundle drops" in status.last_error
    assert client.svid is not None and client.svid.bundle_sequence == 2
    rig.wait_serving()  # the old context still handshakes

    # a stale bundle is ignored (counted), nothing else changes
    v1 = TrustBundle((r1,), 1)
    server_source = rig.sources[0]
    rig.publish(v1, rig.server_dir)
    _wait(lambda: server_source.stale_bundles >= 1, "the server to ignore the stale bundle")
    assert server_source.bundle_sequence == 2 and len(server_source.bundle) == 2
    rig.wait_serving()
    rig.load.close()
    assert rig.load.failures == []
