"""Identity over the network, end to end: join tokens minted by the admin client, traded at a
real registry (uvicorn, TLS, SQLite, signing with its DIR/ca) for SVIDs written into dirs that
never saw the CA directory, strict mTLS calls between the workloads, renewal by the registry
under traffic and across a registry outage (RELIABILITY.md FAULT-16 through the network)."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

import meshlib
from meshlib.cli.token import join_string as cli_join_string
from meshlib.control.client import RegistryRefused, RegistryUnavailable
from meshlib.control.remote import (
    JOIN_PREFIX,
    BootstrapError,
    RemoteIssuer,
    bootstrap,
    parse_join,
    spki_sha256,
)
from meshlib.identity import CertificateAuthority, SpiffeID
from meshlib.identity.bundle import TrustBundle
from meshlib.identity.tls import SVIDSource
from tests.control.conftest import TD, RunningRegistry, StartRegistry
from tests.control.fakes import mesh_policy
from tests.control.waiting import until
from tests.harness.echo import EchoBackend

pytestmark = pytest.mark.timeout(60)

REVIEWS = SpiffeID.for_workload(TD, "default", "reviews")
PRODUCTPAGE = SpiffeID.for_workload(TD, "default", "productpage")

POLICY = mesh_policy(TD, "reviews", "productpage", mtls="strict")

HOURS = 3600.0


def root_pin(registry: RunningRegistry) -> str:
    """What ``meshctl token create --join`` pins: the newest root of the registry's bundle."""
    bundle = TrustBundle.parse((registry.admin_svid / "bundle.pem").read_bytes(), "bundle")
    return spki_sha256(bundle.roots[-1])


def join_string(registry: RunningRegistry, spiffe_id: SpiffeID) -> str:
    """What ``meshctl token create --join`` prints (its own function), checked against ours."""
    token = registry.client().create_token(str(spiffe_id)).token
    bundle = TrustBundle.parse((registry.admin_svid / "bundle.pem").read_bytes(), "bundle")
    text = cli_join_string(registry.url, bundle.roots[-1], token)
    assert text == f"{JOIN_PREFIX}{registry.url}:{root_pin(registry)}:{token}"
    return text


def state_of(registry: RunningRegistry, token: str) -> str:
    id = token.split(".")[1]
    (found,) = [t for t in registry.client().tokens() if t.id == id]
    return found.state


class ShiftedClock:
    """The renewers' wall clock, moved ahead by hand (certificates keep their real dates)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Traffic:
    """Calls ``url`` through ``mesh`` back to back on a thread, counting outcomes."""

    def __init__(self, mesh: meshlib.Mesh, url: str) -> None:
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._client = mesh.client()
        self._url = url
        self._thread = threading.Thread(target=self._run, name="bootstrap-traffic", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            try:
                response = self._client.get(self._url)
            except Exception as exc:  # counted, not raised: the test asserts on them
                self.failed.append(repr(exc))
                continue
            if response.status_code == 200:
                self.ok += 1
            else:
                self.failed.append(f"{response.status_code} {response.text[:200]}")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._client.close()


@pytest.fixture
def workloads(
    registry: RunningRegistry, tmp_path: Path
) -> Iterator[Callable[..., tuple[meshlib.Mesh, Path]]]:
    """``start(service, **from_registry options)``: a mesh for ``service`` whose SVID dir starts
    empty and is filled by a join token the admin client mints."""
    made: list[meshlib.Mesh] = []

    def start(service: str, **kwargs: Any) -> tuple[meshlib.Mesh, Path]:
        svid_dir = tmp_path / f"{service}-svid"
        kwargs.setdefault(
            "join_token", join_string(registry, SpiffeID.for_workload(TD, "default", service))
        )
        mesh = meshlib.Mesh.from_registry(
            registry.url,
            service=service,
            svid_dir=svid_dir,
            cache_dir=tmp_path / f"cache-{service}",
            metrics=False,
            watch_wait=5.0,
            **kwargs,
        )
        made.append(mesh)
        return mesh, svid_dir

    yield start
    for mesh in made:
        mesh.close()


@contextlib.contextmanager
def serve_reviews(mesh: meshlib.Mesh, svid_dir: Path) -> Iterator[Any]:
    server = meshlib.serve(EchoBackend("reviews"), mesh=mesh, svid_dir=str(svid_dir))
    try:
        yield server
    finally:
        server.stop()


def discovered(mesh: meshlib.Mesh, key: str) -> bool:
    found = mesh.discovered().get(key)
    return found is not None and bool(found.endpoints)


def serial(svid_dir: Path) -> int:
    """The serial in cert.pem (one atomic file: the pair may be mid-renewal while a renewer
    runs, key.pem already new and cert.pem not yet)."""
    return x509.load_pem_x509_certificate((svid_dir / "cert.pem").read_bytes()).serial_number


# -- first contact ----------------------------------------------------------------------------


def test_two_workloads_bootstrapped_from_tokens_call_each_other_over_strict_mtls(
    registry: RunningRegistry, workloads: Callable[..., tuple[meshlib.Mesh, Path]]
) -> None:
    registry.client().apply(POLICY)
    reviews, reviews_dir = workloads("reviews")
    productpage, productpage_dir = workloads("productpage")
    for directory, expected in ((reviews_dir, REVIEWS), (productpage_dir, PRODUCTPAGE)):
        assert sorted(p.name for p in directory.iterdir()) == ["bundle.pem", "cert.pem", "key.pem"]
        assert stat.S_IMODE(os.stat(directory / "key.pem").st_mode) == 0o600
        assert SVIDSource(directory).spiffe_id == expected  # the token's identity
    assert productpage.snapshot.mesh.mtls.value == "strict"
    with serve_reviews(reviews, reviews_dir) as server:
        assert until(lambda: discovered(productpage, "reviews.default"))
        with productpage.client() as client:
            response = client.get("http://reviews/hello")
        assert response.status_code == 200
        assert response.headers["x-backend"] == "reviews"
        assert server.port > 0
    # both tokens are spent, each on the serial of the SVID it bought
    rows = {t.spiffe_id: t for t in registry.client().tokens()}
    for directory, expected in ((reviews_dir, REVIEWS), (productpage_dir, PRODUCTPAGE)):
        assert rows[str(expected)].state == "used"
        assert rows[str(expected)].used_by_serial == f"{serial(directory):x}"


def test_a_token_is_used_once(registry: RunningRegistry, tmp_path: Path) -> None:
    join = parse_join(join_string(registry, REVIEWS))
    bundle_pem = (registry.admin_svid / "bundle.pem").read_bytes()  # the out-of-band bundle
    svid = bootstrap(join.url, join.token, tmp_path / "first", bundle_pem=bundle_pem)
    assert svid.spiffe_id == REVIEWS
    with pytest.raises(RegistryRefused, match="join token refused: token already used") as info:
        bootstrap(join.url, join.token, tmp_path / "second", root_spki_sha256=join.root_spki_sha256)
    assert info.value.status == 403
    assert not (tmp_path / "second" / "key.pem").exists()  # nothing written for a refusal


def test_an_expired_token_is_refused(registry_factory: StartRegistry, tmp_path: Path) -> None:
    # The app's wall clock is injected: the token is minted through the API with the shortest
    # TTL (60 s), then the registry's clock moves past it. Handshakes use the real time.
    wall = ShiftedClock()
    registry = registry_factory(wall=wall)
    issued = registry.client().create_token(str(REVIEWS), ttl=60)
    wall.offset = 61.0
    with pytest.raises(RegistryRefused, match="join token refused: token expired at ") as info:
        bootstrap(
            registry.url, issued.token, tmp_path / "svid", root_spki_sha256=root_pin(registry)
        )
    assert info.value.status == 403
    assert state_of(registry, issued.token) == "expired"


def test_a_wrong_pin_is_refused_before_the_token_is_sent(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    join = parse_join(join_string(registry, REVIEWS))
    stranger = spki_sha256(CertificateAuthority.create(TD).certificate)
    with pytest.raises(BootstrapError, match="presented no root whose SPKI SHA-256 is"):
        bootstrap(join.url, join.token, tmp_path / "svid", root_spki_sha256=stranger)
    assert not (tmp_path / "svid").exists()
    assert state_of(registry, join.token) == "unused"  # never reached the registry
    # the same token with the right pin still works: the refusal spent nothing
    assert (
        bootstrap(
            join.url, join.token, tmp_path / "svid", root_spki_sha256=join.root_spki_sha256
        ).spiffe_id
        == REVIEWS
    )


def test_a_root_that_matches_no_registry_is_not_trusted(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    # The out-of-band bundle of another CA: the handshake fails, the token stays unused.
    join = parse_join(join_string(registry, REVIEWS))
    other = TrustBundle((CertificateAuthority.create(TD).certificate,)).to_pem()
    with pytest.raises(RegistryUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        bootstrap(join.url, join.token, tmp_path / "svid", bundle_pem=other)
    assert state_of(registry, join.token) == "unused"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("mlt1.abc.def", "must start with 'meshlib-join:v1:'"),
        ("meshlib-join:v1:" + "a" * 64, "found 1 part(s) after the prefix"),
        ("meshlib-join:v1:http://h:1:" + "a" * 64 + ":mlt1.x.y", "is not https://host"),
        ("meshlib-join:v1:https://h:1:" + "A" * 64 + ":mlt1.x.y", "64 lowercase hex"),
        ("meshlib-join:v1:https://h:1:" + "a" * 64 + ":", "the token (after the last ':')"),
        ("meshlib-join:v1:https://h:x:" + "a" * 64 + ":mlt1.x.y", "has a bad port"),
    ],
)
def test_a_malformed_join_string_says_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as info:
        parse_join(text)
    assert "mlt1.x.y" not in str(info.value)  # never echoes the token


def test_a_join_string_splits_from_the_right() -> None:
    pin = "0" * 64
    join = parse_join(f"meshlib-join:v1:https://127.0.0.1:8443:{pin}:mlt1.abc.s3cret")
    assert (join.url, join.root_spki_sha256, join.token) == (
        "https://127.0.0.1:8443",
        pin,
        "mlt1.abc.s3cret",
    )
    assert "s3cret" not in repr(join)


# -- renewal ----------------------------------------------------------------------------------


def test_an_expired_svid_needs_a_new_token(registry: RunningRegistry) -> None:
    svid_dir = registry.issue("default", "reviews")
    later = SVIDSource(svid_dir).material.certificate.not_valid_after_utc.timestamp() + 1
    issuer = RemoteIssuer(registry.url, svid_dir, clock=lambda: later)
    with pytest.raises(BootstrapError) as info:
        issuer.issue(REVIEWS)
    assert info.value.reason.startswith("SVID expired at ")
    assert info.value.reason.endswith(
        f": a new join token is needed (meshctl token create --spiffe-id {REVIEWS})"
    )


def test_remote_issuer_renews_for_the_callers_identity(registry: RunningRegistry) -> None:
    svid_dir = registry.issue("default", "reviews")
    before = SVIDSource(svid_dir).material.certificate
    svid = RemoteIssuer(registry.url, svid_dir).issue(REVIEWS)
    assert svid.spiffe_id == REVIEWS
    assert svid.certificate.serial_number != before.serial_number
    assert svid.certificate.public_key() != before.public_key()  # a fresh key each time
    assert isinstance(svid.certificate, x509.Certificate)


RENEW_FAST = {"base_delay": 0.05, "max_delay": 0.2}


def test_renewal_through_the_registry_under_traffic_fails_no_call(
    registry: RunningRegistry, workloads: Callable[..., tuple[meshlib.Mesh, Path]]
) -> None:
    registry.client().apply(POLICY)
    clock = ShiftedClock()
    reviews, reviews_dir = workloads("reviews", renew={"clock": clock, **RENEW_FAST})
    productpage, productpage_dir = workloads("productpage", renew={"clock": clock, **RENEW_FAST})
    first = {d: serial(d) for d in (reviews_dir, productpage_dir)}
    with serve_reviews(reviews, reviews_dir):
        assert until(lambda: discovered(productpage, "reviews.default"))
        with Traffic(productpage, "http://reviews/x") as traffic:
            assert until(lambda: traffic.ok >= 20)
            clock.offset = 15 * HOURS  # past any renewal time (half-life + 10 %)
            for mesh in (reviews, productpage):
                renewer = mesh.renewer
                assert renewer is not None
                assert until(lambda r=renewer: r.status.renewals >= 1), renewer.status
            clock.offset = 0.0
            assert all(serial(d) != s for d, s in first.items())
            served = traffic.ok
            assert until(lambda: traffic.ok >= served + 20)  # with the renewed SVIDs
        assert traffic.failed == []
    for mesh in (reviews, productpage):
        assert mesh.renewer is not None and mesh.renewer.status.failures == 0


def test_registry_down_across_renewal_backs_off_and_renews_when_it_returns(
    registry_factory: StartRegistry,
    tmp_path: Path,
) -> None:
    registry = registry_factory()
    registry.client().apply(POLICY)
    clock = ShiftedClock()
    made: list[meshlib.Mesh] = []

    def start(service: str) -> tuple[meshlib.Mesh, Path]:
        svid_dir = tmp_path / f"{service}-svid"
        mesh = meshlib.Mesh.from_registry(
            registry.url,
            service=service,
            svid_dir=svid_dir,
            cache_dir=tmp_path / f"cache-{service}",
            metrics=False,
            watch_wait=5.0,
            join_token=join_string(registry, SpiffeID.for_workload(TD, "default", service)),
            renew={"clock": clock, **RENEW_FAST},
        )
        made.append(mesh)
        return mesh, svid_dir

    try:
        reviews, reviews_dir = start("reviews")
        productpage, productpage_dir = start("productpage")
        first = {d: serial(d) for d in (reviews_dir, productpage_dir)}
        with serve_reviews(reviews, reviews_dir):
            assert until(lambda: discovered(productpage, "reviews.default"))
            with Traffic(productpage, "http://reviews/x") as traffic:
                assert until(lambda: traffic.ok >= 10)
                port, data = registry.server.port, registry.data
                registry.stop()
                clock.offset = 15 * HOURS  # the renewal time passes while the registry is away
                renewers = [m.renewer for m in (reviews, productpage)]
                for renewer in renewers:
                    assert renewer is not None
                    assert until(lambda r=renewer: r.status.failures >= 3), renewer.status
                    assert renewer.status.renewals == 0
                served = traffic.ok
                assert until(lambda: traffic.ok >= served + 20)  # calls keep working
                assert all(serial(d) == s for d, s in first.items())
                registry_factory(data, port=port)  # back, same data dir, same URL
                for renewer in renewers:
                    assert renewer is not None
                    assert until(lambda r=renewer: r.status.renewals >= 1), renewer.status
                clock.offset = 0.0
                assert all(serial(d) != s for d, s in first.items())
                served = traffic.ok
                assert until(lambda: traffic.ok >= served + 10)
            assert traffic.failed == []
    finally:
        for mesh in made:
            mesh.close()


# -- the environment --------------------------------------------------------------------------


def test_from_env_bootstraps_from_a_join_string_alone(
    registry: RunningRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MESHLIB_JOIN_TOKEN's join string names the registry: MESHLIB_REGISTRY is not needed
    registry.client().apply(POLICY)
    svid_dir = tmp_path / "svid"
    monkeypatch.setenv("MESHLIB_SERVICE", "reviews")
    monkeypatch.setenv("MESHLIB_SVID_DIR", str(svid_dir))
    monkeypatch.setenv("MESHLIB_JOIN_TOKEN", join_string(registry, REVIEWS))
    monkeypatch.delenv("MESHLIB_REGISTRY", raising=False)
    monkeypatch.delenv("MESHLIB_POLICY", raising=False)
    with meshlib.Mesh.from_env(cache_dir=tmp_path / "cache", metrics=False) as mesh:
        assert SVIDSource(svid_dir).spiffe_id == REVIEWS
        assert mesh.renewer is not None  # renewed through the registry by default
        assert "reviews.default" in mesh.snapshot.services


def test_from_env_bootstraps_a_bare_token_with_a_bundle_and_keeps_a_usable_svid(
    registry: RunningRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svid_dir = tmp_path / "svid"
    token = registry.client().create_token(str(REVIEWS)).token
    monkeypatch.setenv("MESHLIB_SERVICE", "reviews")
    monkeypatch.setenv("MESHLIB_SVID_DIR", str(svid_dir))
    monkeypatch.setenv("MESHLIB_REGISTRY", registry.url)
    monkeypatch.setenv("MESHLIB_JOIN_TOKEN", token)
    monkeypatch.setenv("MESHLIB_BUNDLE", str(registry.admin_svid / "bundle.pem"))
    monkeypatch.delenv("MESHLIB_POLICY", raising=False)
    with meshlib.Mesh.from_env(cache_dir=tmp_path / "cache", metrics=False, renew=False) as mesh:
        assert mesh.renewer is None  # renew=False opts out
    first = serial(svid_dir)
    assert state_of(registry, token) == "used"
    # a restart with the (now spent) token still set keeps the usable SVID: no second trade
    with meshlib.Mesh.from_env(cache_dir=tmp_path / "cache", metrics=False):
        assert serial(svid_dir) == first


def test_a_bare_token_without_a_bundle_says_what_is_missing(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    token = registry.client().create_token(str(REVIEWS)).token
    with pytest.raises(ValueError, match="a bare join token needs the registry's trust bundle"):
        meshlib.Mesh.from_registry(
            registry.url, service="reviews", svid_dir=tmp_path / "svid", join_token=token
        )
    assert state_of(registry, token) == "unused"
