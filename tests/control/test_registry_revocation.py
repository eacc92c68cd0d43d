"""The registry honours ``meshctl ca revoke`` itself (RELIABILITY.md SEC-6): its CA poll writes
DIR/ca's CRLs into its own SVID dir, its server's rotation watcher reloads them, and a revoked
workload's next handshake with the registry fails; the sign endpoint refuses to renew a revoked
certificate even before that. A real registry (uvicorn, TLS on loopback, its real data dir)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshlib.control.client import RegistryRefused
from meshlib.identity.cadir import CADirectory
from meshlib.identity.crl import CRL_FILE, load_crls
from meshlib.identity.csr import make_csr
from meshlib.identity.spiffe import SpiffeID
from meshlib.identity.tls import SVIDSource
from tests.control.conftest import TD, RunningRegistry, StartRegistry
from tests.control.test_app_consistency import scrape
from tests.control.waiting import until

pytestmark = pytest.mark.timeout(30)

REVIEWS = SpiffeID.for_workload(TD, "default", "reviews")
RATINGS = SpiffeID.for_workload(TD, "default", "ratings")


def _status(registry: RunningRegistry, svid_dir: Path) -> int:
    """GET /v1/status on a new connection (a new handshake) presenting ``svid_dir``'s SVID;
    0 when the handshake (or the connection) fails."""
    context = SVIDSource(svid_dir).client_context()
    with httpx.Client(base_url=registry.url, verify=context, timeout=5.0) as client:
        try:
            return client.get("/v1/status").status_code
        except httpx.TransportError:
            return 0


def test_a_revoked_workload_fails_its_next_handshake_with_the_registry(
    registry_factory: StartRegistry,
) -> None:
    # the server polls its SVID dir every 0.2 s (`registry serve`: 1 s), the CA poll is 1 s
    registry = registry_factory(svid_poll=0.2)
    reviews, ratings = registry.issue("default", "reviews"), registry.issue("default", "ratings")
    assert _status(registry, reviews) == 200 and _status(registry, ratings) == 200
    CADirectory(registry.dir.ca).revoke([reviews / "cert.pem"])
    assert until(lambda: _status(registry, reviews) == 0)
    # refused by the handshake's CRL check, for good; the unrevoked workload is unaffected
    assert (registry.dir.registry_svid / CRL_FILE).read_bytes() == (
        registry.dir.ca / CRL_FILE
    ).read_bytes()
    for _ in range(3):
        assert _status(registry, reviews) == 0
        assert _status(registry, ratings) == 200


def test_a_revoked_svid_cannot_renew_even_before_the_handshake_refuses_it(
    registry_factory: StartRegistry,
) -> None:
    # SVID polling off: the handshake still accepts the revoked leaf, the sign endpoint must not
    registry = registry_factory(metrics=True)
    reviews, ratings = registry.issue("default", "reviews"), registry.issue("default", "ratings")
    CADirectory(registry.dir.ca).revoke([reviews / "cert.pem"])
    with pytest.raises(RegistryRefused) as info:
        registry.client(reviews).sign(make_csr(ec.generate_private_key(ec.SECP256R1()), REVIEWS))
    assert info.value.status == 403
    assert "your SVID cannot be renewed" in info.value.message
    assert "was revoked" in info.value.message
    counted = scrape(registry.http(ratings))
    assert counted[("mesh_registry_refusals_total", (("verb", "sign"),))] == 1
    # an unrevoked SVID, checked against the same CRLs, renews
    signed = registry.client(ratings).sign(
        make_csr(ec.generate_private_key(ec.SECP256R1()), RATINGS)
    )
    assert signed.spiffe_id == str(RATINGS)


def test_the_registrys_own_svid_dir_is_never_rolled_back(registry: RunningRegistry) -> None:
    ca = CADirectory(registry.dir.ca)
    ca.revoke([])
    assert registry.poll_ca()
    own, published = registry.dir.registry_svid / CRL_FILE, registry.dir.ca / CRL_FILE
    older = published.read_bytes()
    assert own.read_bytes() == older
    ca.revoke([])
    assert registry.poll_ca()
    newer = published.read_bytes()
    assert newer != older and own.read_bytes() == newer
    # DIR/ca's crl.pem restored from a backup: published as it is, never over the newer CRLs
    published.write_bytes(older)
    assert registry.poll_ca()
    assert own.read_bytes() == newer and load_crls(own)
