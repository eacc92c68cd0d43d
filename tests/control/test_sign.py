"""POST /v1/ca/sign through a real registry (TLS on loopback, the CA in its data dir), and the
transport rule: a caller without a client certificate is served only /healthz, /readyz and the
join-token form of /v1/ca/sign."""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshlib.cli.registry import RegistryServed
from meshlib.control.client import (
    AsyncRegistryClient,
    RegistryClient,
    RegistryNotFound,
    RegistryRefused,
    RegistryUnavailable,
)
from meshlib.control.store import Store
from meshlib.identity import CertificateAuthority, SpiffeID, verify_svid
from meshlib.identity.bundle import TrustBundle
from meshlib.identity.cadir import CADirectory
from meshlib.identity.csr import make_csr
from meshlib.identity.tls import SVIDSource
from meshlib.inbound.serving import serve
from tests.control.conftest import TD, RunningRegistry, StartRegistry
from tests.control.test_app_consistency import scrape

pytestmark = pytest.mark.timeout(30)

REVIEWS = SpiffeID.for_workload(TD, "default", "reviews")
RATINGS = SpiffeID.for_workload(TD, "default", "ratings")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "control-plane.md"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _bare_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR with no subjectAltName: it asks for no identity."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _bootstrap(registry: RunningRegistry) -> RegistryClient:
    bundle = (registry.admin_svid / "bundle.pem").read_bytes()
    client = RegistryClient.for_bootstrap(registry.url, bundle_pem=bundle)
    registry._closers.append(client.close)
    return client


def _anonymous(registry: RunningRegistry) -> httpx.Client:
    """An httpx client that verifies the registry's chain but presents no certificate."""
    context = ssl.create_default_context(cafile=str(registry.admin_svid / "bundle.pem"))
    context.check_hostname = False
    client = httpx.Client(base_url=registry.url, verify=context, timeout=10.0)
    registry._closers.append(client.close)
    return client


def _check_leaf(leaf_pem: str, bundle_text: str, key: ec.EllipticCurvePrivateKey) -> SpiffeID:
    """The leaf's SPIFFE ID after checking it carries ``key`` and verifies against the bundle."""
    chain = x509.load_pem_x509_certificates(leaf_pem.encode())
    assert chain[0].public_key() == key.public_key()
    bundle = TrustBundle.parse(bundle_text.encode(), "answer")
    assert bundle.sequence >= 1 and bundle_text.startswith("# meshlib-bundle-sequence:")
    return verify_svid(chain, bundle.roots, trust_domain=TD)


# -- the transport rule ----------------------------------------------------------------------


def _documented_routes() -> set[tuple[str, str]]:
    """Every ``METHOD /path`` in the first column of docs/control-plane.md's API table, with
    its placeholders filled: the test walks what the API says it has."""
    routes: set[tuple[str, str]] = set()
    section = DOCS.read_text().split("## The API", 1)[1]
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split(" | ", 1)[0]
        for method, path in re.findall(r"`(GET|PUT|POST|DELETE) (/[^` ?]*)", first):
            filled = (
                path.replace("{ns}", "default")
                .replace("{svc}", "reviews")
                .replace("{id}", "abc")
                .replace("{N}", "1")
            )
            routes.add((method, filled))
    return routes


#: The API as of issue 12, should the docs table lose a row.
ROUTES = {
    ("PUT", "/v1/instances/default/reviews/abc"),
    ("POST", "/v1/instances/default/reviews/abc/heartbeat"),
    ("DELETE", "/v1/instances/default/reviews/abc"),
    ("GET", "/v1/instances"),
    ("GET", "/v1/services"),
    ("GET", "/v1/services/default/reviews/endpoints"),
    ("GET", "/v1/policy"),
    ("PUT", "/v1/policy"),
    ("GET", "/v1/policy/history"),
    ("GET", "/v1/policy/versions/1"),
    ("POST", "/v1/policy/rollback"),
    ("GET", "/v1/sd/prometheus"),
    ("GET", "/v1/status"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/v1/ca/sign"),
    ("GET", "/v1/ca/bundle"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/tokens"),
    ("DELETE", "/v1/tokens/abc"),
    ("GET", "/v1/no-such-path"),
}
OPEN = {("GET", "/healthz"): 200, ("GET", "/readyz"): 200, ("POST", "/v1/ca/sign"): 401}


def test_every_path_but_three_refuses_a_caller_without_a_certificate(
    registry_factory: StartRegistry,
) -> None:
    registry = registry_factory(metrics=True)
    anonymous = _anonymous(registry)
    routes = ROUTES | _documented_routes()
    assert ("GET", "/v1/status") in _documented_routes()  # the docs parse
    refused = 0
    for method, path in sorted(routes):
        answer = anonymous.request(method, path, json={})
        want = OPEN.get((method, path), 403)
        assert answer.status_code == want, f"{method} {path}: {answer.text}"
        if want == 403:
            assert f"no SVID of the trust domain {TD}" in answer.json()["error"], path
            refused += 1
    assert registry.app.refusals == refused + 1  # and the 401 of the sign without a token
    # plain HTTP is still refused: the connection is closed, no answer
    with pytest.raises(httpx.TransportError):
        httpx.get(registry.url.replace("https://", "http://") + "/healthz", timeout=5.0)


# -- renewal (the caller's SVID) -------------------------------------------------------------


def test_renewal_signs_the_csr_key_for_the_callers_id(registry: RunningRegistry) -> None:
    client = registry.client(registry.issue("default", "reviews"))
    key = _key()
    signed = client.sign(make_csr(key, REVIEWS))
    assert signed.spiffe_id == str(REVIEWS)
    assert _check_leaf(signed.certificate, signed.bundle, key) == REVIEWS
    leaf = x509.load_pem_x509_certificate(signed.certificate.encode())
    assert signed.expires_at == leaf.not_valid_after_utc.timestamp()
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime.total_seconds() == 24 * 3600 + 60  # 24 h, backdated one minute
    # recorded in DIR/ca's issued log, so `meshctl ca revoke` finds its root
    cadir = CADirectory(registry.data / "ca")
    assert (leaf.serial_number, str(REVIEWS)) in {(x.serial, x.spiffe_id) for x in cadir.issued()}
    file = registry.svids / "signed.pem"
    file.write_text(signed.certificate)
    assert cadir.revoke([file])[0][0] == leaf.serial_number
    # a CSR naming no identity at all gets the caller's
    bare = client.sign(_bare_csr(_key()))
    assert bare.spiffe_id == str(REVIEWS)


def test_renewal_for_another_id_is_refused_with_the_reason(
    registry_factory: StartRegistry,
) -> None:
    registry = registry_factory(metrics=True)
    svid = registry.issue("default", "reviews")
    with pytest.raises(RegistryRefused) as info:
        registry.client(svid).sign(make_csr(_key(), RATINGS))
    assert info.value.status == 403
    assert f"CSR refused: the CSR asks for URI:{RATINGS}" in info.value.message
    assert f"the identity comes from the token/certificate: {REVIEWS}" in info.value.message
    counted = scrape(registry.http(svid))
    assert counted[("mesh_registry_refusals_total", (("verb", "sign"),))] == 1


def test_async_client_renews(registry: RunningRegistry) -> None:
    svid = registry.issue("default", "reviews")
    key = _key()

    async def renew() -> str:
        async with AsyncRegistryClient(registry.url, svid_dir=str(svid)) as client:
            signed = await client.sign(make_csr(key, REVIEWS))
            return str(_check_leaf(signed.certificate, signed.bundle, key))

    assert asyncio.run(renew()) == str(REVIEWS)


def test_a_registry_without_its_ca_does_not_sign(registry: RunningRegistry) -> None:
    registry.app.ca_dir = None
    with pytest.raises(RegistryNotFound, match="this registry does not sign"):
        registry.client(registry.issue("default", "reviews")).sign(make_csr(_key(), REVIEWS))


# -- first contact (a join token) ------------------------------------------------------------


class StandInRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class StandInGrant:
    spiffe_id: str
    used_by_serial: str | None = None


class StandInTokens:
    """A stand-in for meshlib.control.tokens (its JoinTokens side): a dict, one use each."""

    TokenRefused = StandInRefused

    def __init__(self, tokens: dict[str, str]) -> None:
        self.grants = {text: StandInGrant(spiffe_id) for text, spiffe_id in tokens.items()}
        self.used: dict[str, StandInGrant] = {}

    async def verify_token(self, store: Store, token_text: object, now: float) -> StandInGrant:
        assert isinstance(token_text, str)
        if token_text in self.used:
            raise StandInRefused("token already used")
        if token_text not in self.grants:
            raise StandInRefused("unknown token")
        return self.grants[token_text]

    async def consume(
        self, store: Store, token_text: object, now: float, *, serial: str | None = None
    ) -> StandInGrant:
        grant = await self.verify_token(store, token_text, now)
        assert isinstance(token_text, str)
        self.used[token_text] = replace(grant, used_by_serial=serial)
        return self.used[token_text]


def test_a_join_token_signs_for_its_id_without_an_svid(registry_factory: StartRegistry) -> None:
    tokens = StandInTokens({"mlt1.aaa.secret": str(REVIEWS), "mlt1.bbb.secret": str(REVIEWS)})
    registry = registry_factory(join_tokens=tokens)
    client = _bootstrap(registry)
    # a CSR asking for another ID is refused, and the token stays unused
    with pytest.raises(RegistryRefused) as info:
        client.sign(make_csr(_key(), RATINGS), token="mlt1.aaa.secret")
    assert info.value.status == 403 and f"asks for URI:{RATINGS}" in info.value.message
    assert tokens.used == {}
    key = _key()
    signed = client.sign(make_csr(key, REVIEWS), token="mlt1.aaa.secret")
    assert signed.spiffe_id == str(REVIEWS)
    assert _check_leaf(signed.certificate, signed.bundle, key) == REVIEWS
    leaf = x509.load_pem_x509_certificate(signed.certificate.encode())
    assert tokens.used["mlt1.aaa.secret"].used_by_serial == f"{leaf.serial_number:x}"
    # once only; an unknown token is refused with its reason
    for token, reason in (
        ("mlt1.aaa.secret", "token already used"),
        ("mlt1.zzz.x", "unknown token"),
    ):
        with pytest.raises(RegistryRefused, match=f"join token refused: {reason}"):
            client.sign(make_csr(_key(), REVIEWS), token=token)
    # the identity is the token's: the caller's own certificate, if any, does not change it
    admin = registry.client()
    assert admin.sign(make_csr(_key(), REVIEWS), token="mlt1.bbb.secret").spiffe_id == str(REVIEWS)
    # the bootstrap client may sign, nothing else
    with pytest.raises(RegistryRefused) as refused:
        client.services()
    assert refused.value.status == 403


def test_without_a_token_or_an_svid_sign_is_401(registry_factory: StartRegistry) -> None:
    registry = registry_factory()  # the real join tokens, in the app's own store
    client = _bootstrap(registry)
    with pytest.raises(RegistryRefused) as info:
        client.sign(make_csr(_key(), REVIEWS))
    assert info.value.status == 401
    assert info.value.message == (
        "present a join token (Authorization: Bearer) or your current SVID"
    )
    # a token the registry never minted is refused 403 with the tokens core's reason
    unknown = "mlt1.0123456789ab." + "A" * 43
    with pytest.raises(RegistryRefused, match="join token refused: unknown token") as off:
        client.sign(make_csr(_key(), REVIEWS), token=unknown)
    assert off.value.status == 403


def test_the_bootstrap_client_refuses_a_server_outside_its_bundle(
    registry: RunningRegistry,
) -> None:
    other = CertificateAuthority.create(TD)
    client = RegistryClient.for_bootstrap(
        registry.url, bundle_pem=TrustBundle(other.bundle, 1).to_pem()
    )
    with client, pytest.raises(RegistryUnavailable):
        client.sign(make_csr(_key(), REVIEWS), token="mlt1.aaa.secret")


def test_a_certificate_of_another_ca_is_still_refused_at_the_handshake(
    registry: RunningRegistry, tmp_path: Path
) -> None:
    # optional means "none is fine", never "a wrong one is fine"
    stranger = CertificateAuthority.create(TD).issue(REVIEWS).save(tmp_path / "stranger")
    context = SVIDSource(stranger).client_context()
    context.load_verify_locations(cafile=str(registry.admin_svid / "bundle.pem"))
    with (
        httpx.Client(base_url=registry.url, verify=context, timeout=5.0) as client,
        pytest.raises(httpx.TransportError),
    ):
        client.get("/healthz")


def test_client_cert_optional_needs_tls(registry: RunningRegistry) -> None:
    mesh = RegistryServed(TD)
    svid = str(registry.data / "registry")
    with pytest.raises(ValueError, match="needs TLS"):
        serve(registry.app, mesh=mesh, svid_dir=svid, mode="disable", client_cert="optional")
    with pytest.raises(ValueError, match="'mode' or 'optional'"):
        serve(registry.app, mesh=mesh, svid_dir=svid, mode="strict", client_cert="maybe")


def test_an_unreadable_ca_is_503_and_spends_no_token(registry_factory: StartRegistry) -> None:
    tokens = StandInTokens({"mlt1.aaa.secret": str(REVIEWS)})
    registry = registry_factory(join_tokens=tokens)
    key_file = registry.data / "ca" / "ca-key.pem"
    key_file.chmod(0o644)  # CertificateAuthority.load refuses a key others can read
    with pytest.raises(RegistryUnavailable) as info:
        _bootstrap(registry).sign(make_csr(_key(), REVIEWS), token="mlt1.aaa.secret")
    assert info.value.status == 503 and "readable by others" in info.value.message
    assert tokens.used == {}
    key_file.chmod(0o600)
    signed = _bootstrap(registry).sign(make_csr(_key(), REVIEWS), token="mlt1.aaa.secret")
    assert signed.spiffe_id == str(REVIEWS)
