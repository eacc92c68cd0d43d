"""SVID renewal schedule and back-off (FAULT-16), on a fake clock with seeded randomness: the
renewer asks at half-life, retries a failing issuer with bounded exponential back-off, raises
the overdue alert at 80 % of the lifetime, and renews once the issuer is back. Real files (the
SVID directory), no sockets."""

from __future__ import annotations

import datetime as dt
import logging
import random
import stat
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from meshlib.identity import X509SVID, CAError, CertificateAuthority, SpiffeID
from meshlib.identity.renewal import (
    LocalIssuer,
    Renewer,
    backoff_delay,
    overdue_time,
)
from meshlib.identity.tls import SVIDSource
from meshlib.observe.metrics import MeshMetrics

TD = "renew.test"
WEB = SpiffeID.for_workload(TD, "default", "web")
LIFETIME = dt.timedelta(hours=1)


# --- pure functions ----------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    rng = random.Random(11)
    delays = [backoff_delay(n, rng, base=1.0, cap=30.0) for n in range(1, 12)]
    for n, delay in enumerate(delays, start=1):
        ceiling = min(30.0, 2.0 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 30.0 and delays[-1] >= 15.0  # capped, still jittered
    assert backoff_delay(10_000, rng, base=1.0, cap=30.0) <= 30.0  # no overflow
    again = random.Random(11)
    assert [backoff_delay(n, again, base=1.0, cap=30.0) for n in range(1, 12)] == delays
    with pytest.raises(ValueError):
        backoff_delay(0, rng)


def test_overdue_at_eighty_percent_of_the_lifetime() -> None:
    assert overdue_time(1000.0, 2000.0) == 1800.0
    assert overdue_time(5.0, 5.0) == 5.0


# --- the renewer on a fake clock ----------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Switchable:
    """An issuer that is down (raises, as a missing CA does) until ``up`` is set."""

    def __init__(self, ca_dir: Path, clock: FakeClock) -> None:
        self.inner = LocalIssuer(ca_dir, ttl=LIFETIME, clock=lambda: _utc(clock.now))
        self.up = True
        self.calls = 0

    def issue(self, spiffe_id: SpiffeID) -> X509SVID:
        self.calls += 1
        if not self.up:
            raise CAError("CA unavailable (connection refused)")
        return self.inner.issue(spiffe_id)


def _utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


Setup = tuple[SVIDSource, Switchable, MeshMetrics, CollectorRegistry, FakeClock]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    ca = CertificateAuthority.create(TD)
    ca.save(tmp_path / "ca")
    ca.issue(WEB, ttl=LIFETIME, backdate=dt.timedelta(0)).save(tmp_path / "svid")
    registry = CollectorRegistry()
    source = SVIDSource(tmp_path / "svid")
    clock = FakeClock(source.material.certificate.not_valid_before_utc.timestamp())
    return source, Switchable(tmp_path / "ca", clock), MeshMetrics(registry), registry, clock


def _times(source: SVIDSource) -> tuple[float, float]:
    cert = source.material.certificate
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def _sample(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name, {"identity": str(WEB)})


def test_renews_at_half_life_retries_with_backoff_and_recovers(
    setup: Setup,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source, issuer, metrics, registry, clock = setup
    not_before, not_after = _times(source)
    life = not_after - not_before
    clock.now = not_before + 0.1 * life
    renewer = Renewer(
        source, issuer, clock=clock, rng=random.Random(5), base_delay=2.0, max_delay=60.0,
        metrics=metrics,
    )  # fmt: skip

    # before the renewal time: nothing asked, wait exactly until it
    wait = renewer.step()
    renew_at = renewer.status.renew_at
    assert not_before + 0.4 * life <= renew_at <= not_before + 0.6 * life
    assert wait == pytest.approx(renew_at - clock.now)
    assert issuer.calls == 0 and _sample(registry, "mesh_cert_renewal_overdue") == 0.0

    # the CA is down from the renewal point on: bounded exponential back-off
    issuer.up = False
    clock.now = renew_at
    delays = []
    for _ in range(8):
        delays.append(renewer.step())
        clock.now += delays[-1]
    for n, delay in enumerate(delays, start=1):
        assert min(60.0, 2.0 * 2 ** (n - 1)) / 2 <= delay <= min(60.0, 2.0 * 2 ** (n - 1))
    assert renewer.status.failures == 8 == issuer.calls
    assert _sample(registry, "mesh_cert_renewal_failures_total") == 8.0
    assert not renewer.status.overdue  # still before 80 %

    # past 80 % of the lifetime the alert fires; past expiry the renewer keeps trying
    clock.now = not_before + 0.81 * life
    assert renewer.step() <= 60.0
    assert renewer.status.overdue and _sample(registry, "mesh_cert_renewal_overdue") == 1.0
    clock.now = not_after + 1.0
    with caplog.at_level(logging.ERROR, "meshlib.identity.renewal"):
        assert renewer.step() <= 60.0
    assert "EXPIRED" in caplog.text and "CA unavailable" in caplog.text
    old_serial = source.material.certificate.serial_number

    # the CA is back: the next attempt renews, files replaced, the alert clears
    issuer.up = True
    clock.now = source.material.certificate.not_valid_after_utc.timestamp() + 2.0
    wait = renewer.step()
    assert renewer.status.renewals == 1 and renewer.status.failures == 0
    assert renewer.status.last_error is None
    assert _sample(registry, "mesh_cert_renewal_overdue") == 0.0
    on_disk = x509_serial(source.directory / "cert.pem")
    assert on_disk != old_serial
    assert stat.S_IMODE((source.directory / "key.pem").stat().st_mode) == 0o600  # SEC-14
    # the next round is planned for the new certificate, even before the source reloads it
    assert wait == pytest.approx(renewer.status.renew_at - clock.now)
    assert renewer.status.expires_at == pytest.approx(clock.now + LIFETIME.total_seconds())
    assert renewer.step() > 0 and issuer.calls == 11


def test_renewal_schedule_is_reproducible_with_a_seed(
    setup: Setup,
) -> None:
    source, issuer, _, _, _ = setup
    not_before, _ = _times(source)
    runs = []
    for _ in range(2):
        renewer = Renewer(source, issuer, clock=FakeClock(not_before), rng=random.Random(9))
        renewer.step()
        runs.append(renewer.status.renew_at)
    assert runs[0] == runs[1]
    other = Renewer(source, issuer, clock=FakeClock(not_before), rng=random.Random(10))
    other.step()
    assert other.status.renew_at != runs[0]


def test_a_renewed_pair_that_does_not_load_is_retried(
    setup: Setup,
) -> None:
    source, issuer, _, _, _ = setup
    _, not_after = _times(source)

    def refuse(_svid: X509SVID) -> None:
        raise CAError("renewed SVID refused")

    renewer = Renewer(source, issuer, clock=FakeClock(not_after - 1), on_renewed=refuse)
    assert renewer.step() <= renewer.base_delay
    assert renewer.status.failures == 1 and renewer.status.last_error == "renewed SVID refused"
    renewer.step()
    assert issuer.calls == 2  # asked again, not parked until the new pair's half-life


def test_bad_delays_and_reprs_without_keys(
    setup: Setup,
) -> None:
    """SEC-14: a renewer, its issuer and status never show key material."""
    source, issuer, _, _, _ = setup
    with pytest.raises(ValueError):
        Renewer(source, issuer, base_delay=0)
    with pytest.raises(ValueError):
        Renewer(source, issuer, base_delay=5, max_delay=1)
    text = repr(Renewer(source, issuer.inner)) + repr(issuer.inner.issue(WEB))
    assert "PRIVATE KEY" not in text and "key=" not in text


def x509_serial(path: Path) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number
