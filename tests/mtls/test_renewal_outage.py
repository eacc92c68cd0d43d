"""FAULT-16 with real handshakes: the CA is unavailable from before the renewal point until past
expiry. Calls keep working until the client SVID expires, then fail closed (never plaintext);
the alert gauge is up; once the CA is back the next retry renews and calls succeed again."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.identity import X509SVID, SpiffeID
from meshlib.identity.renewal import LocalIssuer

from .conftest import CLIENT_ID, PKI, TD, mesh_text

pytestmark = pytest.mark.timeout(30)

REVIEWS_ID = SpiffeID.for_workload(TD, "default", "reviews")
MAX_DELAY = 0.3  # the renewer's retry interval bound (scaled)


class Recording:
    """Wraps an issuer; lets the test wait for attempts (time, ok) as they happen."""

    def __init__(self, inner: LocalIssuer) -> None:
        self.inner = inner
        self.attempts: list[tuple[float, bool]] = []
        self.changed = threading.Condition()

    def issue(self, spiffe_id: SpiffeID) -> X509SVID:
        try:
            svid = self.inner.issue(spiffe_id)
        except Exception:
            self._record(False)
            raise
        self._record(True)
        return svid

    def _record(self, ok: bool) -> None:
        with self.changed:
            self.attempts.append((time.time(), ok))
            self.changed.notify_all()

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self.attempts), timeout), self.attempts


def test_ca_outage_past_expiry_fails_closed_then_recovers(pki: PKI, start: Any) -> None:
    ca_dir = pki.ca.save(pki.root / "ca")
    away = pki.root / "ca-away"
    server, app = start(pki.ca.issue(REVIEWS_ID).save(pki.root / "reviews"))  # strict
    # the client's SVID lives 4 s (scaled from hours): renewal at 2 s ± 0.4 s, alert at 3.2 s
    short = pki.ca.issue(CLIENT_ID, ttl=dt.timedelta(seconds=4), backdate=dt.timedelta(0))
    client_dir = short.save(pki.root / "web")
    not_after = short.certificate.not_valid_after_utc.timestamp()
    registry = CollectorRegistry()
    mesh = meshlib.Mesh.from_text(
        mesh_text("strict")
        + "---\napiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\n"
        + f'spec: {{endpoints: [{{address: "127.0.0.1:{server.port}"}}]}}\n',
        service="web",
        registry=registry,
        svid_dir=str(client_dir),
        svid_poll_interval=0.05,
    )
    issuer = Recording(LocalIssuer(ca_dir, ttl=dt.timedelta(minutes=5)))
    labels = {"identity": str(CLIENT_ID)}

    def call() -> httpx.Response:
        # a new client per call: every call makes a fresh handshake with the current SVID
        with mesh.client(timeout=2.0) as client:
            return client.get("http://reviews/")

    try:
        assert call().text == str(CLIENT_ID)
        Path(ca_dir).rename(away)  # the CA goes away before the renewal point
        mesh.start_renewal(issuer, base_delay=0.05, max_delay=MAX_DELAY)

        issuer.wait_for(lambda a: any(not ok for _, ok in a))
        assert time.time() < not_after
        assert call().status_code == 200  # traffic continues until expiry

        issuer.wait_for(lambda a: any(t > not_after + 0.1 for t, _ in a))
        assert registry.get_sample_value("mesh_cert_renewal_overdue", labels) == 1.0
        failures = registry.get_sample_value("mesh_cert_renewal_failures_total", labels)
        assert failures is not None and failures >= 3  # retried, with back-off
        seen = len(app.scopes)
        with pytest.raises(httpx.HTTPError):
            call()  # the handshake with the expired SVID fails: closed, not plaintext
        assert len(app.scopes) == seen
        assert all(scope["scheme"] == "https" for scope in app.scopes)

        back = time.time()
        away.rename(ca_dir)  # the CA returns
        issuer.wait_for(lambda a: a[-1][1])
        # within one retry interval (plus scheduling slack on a loaded machine)
        assert issuer.attempts[-1][0] - back <= MAX_DELAY + 0.3
        response = call()
        assert (response.status_code, response.text) == (200, str(CLIENT_ID))
        assert registry.get_sample_value("mesh_cert_renewal_overdue", labels) == 0.0
        assert mesh.svid is not None and mesh.svid.material.certificate != short.certificate
    finally:
        mesh.close()
