"""The registry's HTTP client, sync and async: one method per endpoint of the API
(docs/control-plane.md, "The API"), over mutual TLS with an SVID directory, the registry's
SPIFFE ID pinned, answers as :mod:`meshlib.control.wire` values, failures as typed errors.

Each method builds a :class:`_Call` (the request and how to read its answer) in
:class:`_Calls`, shared by both clients; only sending it differs. The server's identity is
checked by :mod:`meshlib.identity.pinned`'s transports, the same check mesh calls use: after
the handshake and before any request byte, the server must present a valid SVID of the trust
domain whose ID is ``spiffe://TD/ns/meshlib-system/sa/registry``.

A workload without an SVID yet (its first contact, with a join token) uses
:meth:`RegistryClient.for_bootstrap`: server-authenticated TLS against a trust bundle obtained
out of band, the same registry ID pinned, no client certificate; only :meth:`~RegistryClient.sign`
with a token is served to it.

Several registries (replicas over one store): ``url`` may be a list, or a string of URLs
separated by commas; :class:`RegistryURLs` keeps which one is current. A connect failure (the
request was never sent) is retried at once on the next URL, each URL at most once per call;
any other failure of the transport, a timeout or a 503 moves the client to the next URL for
its next call and raises as with one URL (the callers' loops back off with full jitter). The
clients of one workload share one :class:`RegistryURLs`, so a rotation one of them makes is
the one every watch follows, and it is logged once.

Errors (:class:`RegistryError` has ``status``, ``message`` and the JSON ``body``)::

    RegistryError            any other refusal (400, 405, 413...)
    ├── RegistryUnavailable  no answer, a timeout, 5xx or 429: try later (.retry_after)
    ├── RegistryRefused      403: this SVID may not do that (401: no credentials at all)
    ├── RegistryNotFound     404
    ├── RegistryConflict     409: If-Match lost (.current is the version now)
    └── PolicyRejected       422: the policy did not load (.problems, one "file:line: ..." each)
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlsplit

import httpcore
import httpx
from cryptography import x509

from meshlib.control.registry import instance_id
from meshlib.control.wire import (
    AUTHORITATIVE_HEADER,
    CLIENT_KEEP_ALIVE,
    EPOCH_HEADER,
    SOURCE_HEADER,
    BundleAnswer,
    EndpointsAnswer,
    InstanceInfo,
    PolicyAnswer,
    RegistryStatusInfo,
    ServiceInfo,
    TokenInfo,
    TokenIssued,
    WireError,
    registry_id,
)
from meshlib.identity.bundle import TrustBundle
from meshlib.identity.ca import uri_sans
from meshlib.identity.pinned import (
    AsyncPinnedTransport,
    PinnedTransport,
    ServerCheck,
    server_svid,
)
from meshlib.identity.spiffe import SpiffeID, SpiffeIDError
from meshlib.identity.svid import SVIDError, verify_svid
from meshlib.identity.tls import SVIDSource, peer_chain

__all__ = [
    "Applied",
    "AsyncRegistryClient",
    "PolicyRejected",
    "Registered",
    "RegistryClient",
    "RegistryConflict",
    "RegistryError",
    "RegistryNotFound",
    "RegistryRefused",
    "RegistryURLs",
    "RegistryUnavailable",
    "Signed",
    "registry_urls",
]

T = TypeVar("T")

log = logging.getLogger("meshlib.control")


class RegistryError(Exception):
    """The registry refused a request (or answered what the API does not promise); ``url`` is
    the registry that answered (one of a client's several URLs), None when none did."""

    url: str | None = None

    def __init__(self, status: int, message: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"registry: {message}" if status == 0 else f"registry {status}: {message}")
        self.status = status
        self.message = message
        self.body: Mapping[str, Any] = body or {}


class RegistryUnavailable(RegistryError):
    """No answer (connect error, timeout, a server that is not the registry), 5xx or 429;
    ``retry_after`` is the server's ``Retry-After`` in seconds when it sent one."""

    def __init__(
        self,
        status: int,
        message: str,
        body: Mapping[str, Any] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, message, body)
        self.retry_after = retry_after


class RegistryRefused(RegistryError):
    """403: the caller's SVID may not do this."""


class RegistryNotFound(RegistryError):
    """404: no such instance, policy version or endpoint."""


class RegistryConflict(RegistryError):
    """409: the If-Match version is not the current one, which is ``current``."""

    def __init__(self, status: int, message: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(status, message, body)
        current = self.body.get("current")
        self.current: int | None = current if isinstance(current, int) else None


class PolicyRejected(RegistryError):
    """422: the policy did not load; ``problems`` lists every problem (``file:line: ...``)."""

    def __init__(self, status: int, message: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(status, message, body)
        problems = self.body.get("problems")
        self.problems: tuple[str, ...] = (
            tuple(str(p) for p in problems) if isinstance(problems, list) else ()
        )


_BY_STATUS: dict[int, type[RegistryError]] = {
    401: RegistryRefused,
    403: RegistryRefused,
    404: RegistryNotFound,
    409: RegistryConflict,
    422: PolicyRejected,
}


@dataclass(frozen=True)
class Registered:
    """The answer to a register: the instance's id, what changed, the service's index, the
    TTL granted and the heartbeat interval the registry asks for."""

    id: str
    change: str
    index: int
    ttl: float
    heartbeat_interval: float


@dataclass(frozen=True)
class Applied:
    """The answer to an apply or a rollback: the current version after it."""

    version: int
    digest: str
    changed: bool = True
    rollback_of: int | None = None


@dataclass(frozen=True)
class Signed:
    """The answer to a sign: the certificate chain (leaf first, PEM), the trust bundle's file
    text (with its sequence line), the SPIFFE ID signed for and when the leaf expires (unix
    seconds)."""

    certificate: str
    bundle: str
    spiffe_id: str
    expires_at: float


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request, and how to read its 2xx answer."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: Mapping[str, str] = field(default_factory=dict)
    json: Any = None
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Seconds the server may hold the request (a blocking query) beyond the usual timeout.
    hold: float = 0.0
    #: A 404 that means "already done" (a drain of an instance that is gone) reads as this.
    missing: Callable[[], T] | None = None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise RegistryError(
            response.status_code, f"answer is not JSON: {response.text[:200]!r}"
        ) from None


def _check(response: httpx.Response) -> None:
    """Raise the typed error a non-2xx answer stands for."""
    status = response.status_code
    if 200 <= status < 300:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    message = str(body.get("error") or f"HTTP {status} {response.reason_phrase}")
    error: RegistryError
    if status == 429 or status >= 500:
        retry = response.headers.get("Retry-After", "")
        retry_after = float(retry) if retry.replace(".", "", 1).isdigit() else None
        error = RegistryUnavailable(status, message, body, retry_after=retry_after)
    else:
        error = _BY_STATUS.get(status, RegistryError)(status, message, body)
    error.url = f"{response.url.scheme}://{response.url.netloc.decode('ascii')}"
    raise error


def _epoch(epoch: str | None) -> dict[str, str]:
    """The epoch the index came from: the registry answers at once if it is not its own."""
    return {"epoch": epoch} if epoch else {}


def _wait(wait: float | None) -> dict[str, str]:
    return {} if wait is None else {"wait": f"{wait:g}s"}


def _if_match(version: int | None) -> dict[str, str]:
    return {} if version is None else {"If-Match": f'"{version}"'}


def _endpoints(response: httpx.Response) -> EndpointsAnswer:
    return EndpointsAnswer.from_json(_json(response))


def _policy(response: httpx.Response) -> PolicyAnswer:
    return PolicyAnswer.from_json(
        _json(response),
        epoch=response.headers.get(EPOCH_HEADER, ""),
        authoritative=response.headers.get(AUTHORITATIVE_HEADER, "true") == "true",
    )


def _bundle(response: httpx.Response) -> BundleAnswer:
    return BundleAnswer.from_json(_json(response), epoch=response.headers.get(EPOCH_HEADER, ""))


def _list(response: httpx.Response, name: str) -> list[Any]:
    found = _json(response)
    items = found.get(name) if isinstance(found, dict) else None
    if not isinstance(items, list):
        raise WireError(f"{name} answer: field {name!r} must be a list")
    return items


def _instances(response: httpx.Response) -> tuple[InstanceInfo, ...]:
    return tuple(
        InstanceInfo.from_json(item, f"instances answer: instances[{n}]")
        for n, item in enumerate(_list(response, "instances"))
    )


def _services(response: httpx.Response) -> tuple[ServiceInfo, ...]:
    return tuple(
        ServiceInfo.from_json(item, f"services answer: services[{n}]")
        for n, item in enumerate(_list(response, "services"))
    )


class _Calls:
    """The requests of the API, built once for both clients."""

    def register(
        self,
        namespace: str,
        service: str,
        address: str,
        port: int,
        *,
        labels: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        ttl: float | None = None,
    ) -> _Call[Registered]:
        body: dict[str, Any] = {
            "address": address,
            "port": port,
            "labels": dict(labels or {}),
            "metrics_port": metrics_port,
        }
        if ttl is not None:
            body["ttl"] = ttl
        id = instance_id(namespace, service, address, port)  # the server checks the same

        def read(response: httpx.Response) -> Registered:
            found = _json(response)
            return Registered(
                str(found["id"]),
                str(found["change"]),
                int(found["index"]),
                float(found["ttl"]),
                float(found["heartbeat_interval"]),
            )

        return _Call("PUT", f"/v1/instances/{namespace}/{service}/{id}", read, json=body)

    def heartbeat(
        self,
        namespace: str,
        service: str,
        id: str,
        *,
        applied_version: int | None = None,
        rejected_version: int | None = None,
        error: str | None = None,
    ) -> _Call[float]:
        body = {
            "applied_version": applied_version,
            "rejected_version": rejected_version,
            "error": error,
        }
        path = f"/v1/instances/{namespace}/{service}/{id}/heartbeat"
        return _Call("POST", path, lambda r: float(_json(r)["ttl"]), json=body)

    def deregister(self, namespace: str, service: str, id: str) -> _Call[int | None]:
        path = f"/v1/instances/{namespace}/{service}/{id}"
        return _Call("DELETE", path, lambda r: int(_json(r)["index"]), missing=lambda: None)

    def instances(self) -> _Call[tuple[InstanceInfo, ...]]:
        return _Call("GET", "/v1/instances", _instances)

    def services(self) -> _Call[tuple[ServiceInfo, ...]]:
        return _Call("GET", "/v1/services", _services)

    def endpoints(
        self,
        namespace: str,
        service: str,
        *,
        index: int = 0,
        wait: float | None = None,
        epoch: str | None = None,
    ) -> _Call[EndpointsAnswer]:
        path = f"/v1/services/{namespace}/{service}/endpoints"
        params = {"index": str(index), **_wait(wait), **_epoch(epoch)}
        return _Call("GET", path, _endpoints, params=params, hold=_held(index, wait))

    def policy(
        self, *, index: int = 0, wait: float | None = None, epoch: str | None = None
    ) -> _Call[PolicyAnswer]:
        params = {"index": str(index), **_wait(wait), **_epoch(epoch)}
        return _Call("GET", "/v1/policy", _policy, params=params, hold=_held(index, wait))

    def apply(
        self, text: str, *, if_match: int | None = None, source: str | None = None
    ) -> _Call[Applied]:
        headers = {**_if_match(if_match), **({SOURCE_HEADER: source} if source else {})}

        def read(response: httpx.Response) -> Applied:
            found = _json(response)
            return Applied(int(found["version"]), str(found["digest"]), bool(found["changed"]))

        return _Call("PUT", "/v1/policy", read, content=text.encode(), headers=headers)

    def history(self) -> _Call[tuple[PolicyAnswer, ...]]:
        def read(response: httpx.Response) -> tuple[PolicyAnswer, ...]:
            return tuple(
                PolicyAnswer.from_json({**v, "text": ""}) for v in _json(response)["versions"]
            )

        return _Call("GET", "/v1/policy/history", read)

    def version(self, version: int) -> _Call[PolicyAnswer]:
        return _Call("GET", f"/v1/policy/versions/{version}", _policy)

    def rollback(self, version: int, *, if_match: int | None = None) -> _Call[Applied]:
        def read(response: httpx.Response) -> Applied:
            found = _json(response)
            return Applied(
                int(found["version"]),
                str(found["digest"]),
                bool(found.get("changed", True)),
                rollback_of=int(found["rollback_of"]),
            )

        return _Call(
            "POST",
            "/v1/policy/rollback",
            read,
            json={"version": version},
            headers=_if_match(if_match),
        )

    def bundle(
        self, *, index: int = 0, wait: float | None = None, epoch: str | None = None
    ) -> _Call[BundleAnswer]:
        params = {"index": str(index), **_wait(wait), **_epoch(epoch)}
        return _Call("GET", "/v1/ca/bundle", _bundle, params=params, hold=_held(index, wait))

    def prometheus_sd(self) -> _Call[list[dict[str, Any]]]:
        return _Call("GET", "/v1/sd/prometheus", lambda r: list(_json(r)))

    def status(self) -> _Call[RegistryStatusInfo]:
        return _Call("GET", "/v1/status", lambda r: RegistryStatusInfo.from_json(_json(r)))

    def create_token(self, spiffe_id: str, *, ttl: float | None = None) -> _Call[TokenIssued]:
        body: dict[str, Any] = {"spiffe_id": spiffe_id}
        if ttl is not None:
            body["ttl"] = ttl
        return _Call("POST", "/v1/tokens", lambda r: TokenIssued.from_json(_json(r)), json=body)

    def tokens(self) -> _Call[tuple[TokenInfo, ...]]:
        def read(response: httpx.Response) -> tuple[TokenInfo, ...]:
            return tuple(
                TokenInfo.from_json(item, f"tokens answer: tokens[{n}]")
                for n, item in enumerate(_list(response, "tokens"))
            )

        return _Call("GET", "/v1/tokens", read)

    def revoke_token(self, id: str) -> _Call[float]:
        path = f"/v1/tokens/{quote(id, safe='')}"
        return _Call("DELETE", path, lambda r: float(_json(r)["revoked_at"]))

    def sign(self, csr_pem: bytes | str, token: str | None = None) -> _Call[Signed]:
        def read(response: httpx.Response) -> Signed:
            body = _json(response)
            fields = {k: body[k] for k in ("certificate", "bundle", "spiffe_id")}
            for name, value in fields.items():
                if not isinstance(value, str):
                    raise ValueError(f"{name} is {type(value).__name__}, not a string")
            expires = body["expires_at"]
            if isinstance(expires, bool) or not isinstance(expires, (int, float)):
                raise ValueError(f"expires_at is {type(expires).__name__}, not a number")
            return Signed(**fields, expires_at=float(expires))

        pem = csr_pem.decode("ascii") if isinstance(csr_pem, bytes) else csr_pem
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return _Call("POST", "/v1/ca/sign", read, json={"csr": pem}, headers=headers)


def _held(index: int, wait: float | None) -> float:
    """How long the server may hold a blocking query: wait plus its jitter (wait/16)."""
    if not index:
        return 0.0
    return (60.0 if wait is None else wait) * 17 / 16


class _RegistryCheck:
    """The registry client's server check: an SVID of the trust domain with the registry's ID
    (a :class:`meshlib.identity.pinned.ServerCheck`)."""

    def __init__(self, source: SVIDSource) -> None:
        self._source = source
        self.expected = registry_id(source.trust_domain)

    def client_context(self) -> ssl.SSLContext:
        return self._source.current_client_context()

    def verify(self, host: str, port: int, ssl_object: Any) -> None:
        td = self._source.trust_domain
        actual = server_svid(host, port, ssl_object, self._source, td, "the registry")
        if str(actual) != self.expected:
            raise httpcore.ConnectError(
                f"mTLS: server {host}:{port} is {actual}, not the registry ({self.expected})"
            )


class _BootstrapCheck:
    """The server check of a client without an SVID: server-authenticated TLS against
    ``roots`` (a trust bundle obtained out of band), the registry's SPIFFE ID pinned."""

    def __init__(self, roots: Sequence[x509.Certificate], trust_domain: str) -> None:
        self._roots = tuple(roots)
        self._trust_domain = trust_domain
        self.expected = registry_id(trust_domain)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if hasattr(ssl, "VERIFY_X509_STRICT"):
            context.verify_flags |= ssl.VERIFY_X509_STRICT
        context.load_verify_locations(cadata=TrustBundle(self._roots).to_pem().decode("ascii"))
        context.check_hostname = False  # a SPIFFE ID is a URI SAN: verify() checks it
        context.verify_mode = ssl.CERT_REQUIRED
        self._context = context

    def client_context(self) -> ssl.SSLContext:
        return self._context

    def verify(self, host: str, port: int, ssl_object: Any) -> None:
        leaf_der = None if ssl_object is None else ssl_object.getpeercert(True)
        if leaf_der is None:
            raise httpcore.ConnectError(f"TLS: server {host}:{port} presented no certificate")
        chain = [x509.load_der_x509_certificate(der) for der in peer_chain(ssl_object, leaf_der)]
        try:
            verify_svid(
                chain, self._roots, trust_domain=self._trust_domain, expected_id=self.expected
            )
        except SVIDError as exc:
            raise httpcore.ConnectError(
                f"TLS: server {host}:{port} is not the registry ({self.expected}): {exc.reason}"
            ) from None


def _bootstrap_check(bundle_pem: bytes) -> _BootstrapCheck:
    """The check for a bundle file's text; its roots' ``spiffe://TD`` SAN names the trust
    domain (as :meth:`meshlib.identity.CertificateAuthority.load` reads it)."""
    bundle = TrustBundle.parse(bundle_pem, "the bootstrap bundle")
    for root in bundle.roots:
        for uri in uri_sans(root):
            try:
                found = SpiffeID.parse(uri)
            except SpiffeIDError:
                continue
            if found.is_trust_domain:
                return _BootstrapCheck(bundle.roots, found.trust_domain)
    raise ValueError("the bootstrap bundle has no root with a 'spiffe://<trust-domain>' URI SAN")


def registry_urls(url: str | Sequence[str]) -> tuple[str, ...]:
    """The registry URLs ``url`` names: one URL, several separated by commas, or a sequence of
    either; each ``scheme://host[:port]`` with its trailing ``/`` removed. Raises
    :class:`ValueError` naming the first bad one (an empty entry, no host, a bad port, a URL
    given twice)."""
    parts = [url] if isinstance(url, str) else list(url)
    found: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"a registry URL is a string, got {type(part).__name__}")
        found.extend(each.strip().rstrip("/") for each in part.split(","))
    if not found:
        raise ValueError("no registry URL given")
    for n, each in enumerate(found, 1):
        where = f"registry URL #{n} of {len(found)}" if len(found) > 1 else "registry URL"
        if not each:
            raise ValueError(f"{where} is empty (a stray comma in {url!r}?)")
        parsed = urlsplit(each)
        if parsed.scheme not in ("https", "http") or not parsed.hostname:
            raise ValueError(f"{where} {each!r} is not https://host[:port]")
        try:
            parsed.port  # noqa: B018 - a property that raises on a malformed port
        except ValueError:
            raise ValueError(f"{where} {each!r} has a bad port") from None
        if found.index(each) != n - 1:
            raise ValueError(f"{where} {each!r} is listed twice")
    return tuple(found)


class RegistryURLs:
    """The registry URLs a client fails over between, and which one is current. Thread-safe:
    a workload's clients (each on its own event loop) share one, so they all follow a rotation
    and it is logged once, not once per request or per watch."""

    def __init__(self, url: str | Sequence[str]) -> None:
        self.urls = registry_urls(url)
        self._index = 0
        self._lock = threading.Lock()
        #: Whether the current URL has answered since it became current: a rotation away from
        #: one that never did (every registry down, one call after another) is not news.
        self._answered = False

    @property
    def url(self) -> str:
        """The URL the next call goes to first."""
        return self.urls[self._index]

    def after(self, url: str) -> str:
        """The URL that comes after ``url`` in the list (wrapping)."""
        return self.urls[(self.urls.index(url) + 1) % len(self.urls)]

    def answered(self) -> None:
        self._answered = True

    def failed(self, url: str, reason: object) -> None:
        """``url`` failed: move on to the next URL, unless another call already moved the
        client away from it (the watches held on a registry that stopped all fail together;
        the first one moves the client, the rest find it moved)."""
        if len(self.urls) == 1:
            return
        with self._lock:
            if self.urls[self._index] != url:
                return
            self._index = (self._index + 1) % len(self.urls)
            answered, self._answered = self._answered, False
            now = self.urls[self._index]
        if answered:
            log.warning("registry %s failed (%s): moving to %s", url, reason, now)
        else:
            log.debug("registry %s failed (%s): moving to %s", url, reason, now)

    def __repr__(self) -> str:
        return f"RegistryURLs({','.join(self.urls)!r}, current={self.url!r})"


#: The pool of blocking queries (discovery holds one long-poll per watched service on it).
_WATCH_LIMITS = httpx.Limits(
    max_connections=None, max_keepalive_connections=None, keepalive_expiry=CLIENT_KEEP_ALIVE
)

#: How many connections a client opens at most for calls that are not blocking queries
#: (register, heartbeat, sign, ...): a burst of them queues on these instead of opening a
#: mutual-TLS connection each (≈ 0.1 MB of registry memory per connection, and a handshake).
CALL_CONNECTIONS = 8


#: Failures of a request that was never sent: the next URL is tried at once.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)

#: What a client is given as its registry: one URL, several (a sequence, or a string of URLs
#: separated by commas), or a :class:`RegistryURLs` shared with other clients.
RegistryAt = str | Sequence[str] | RegistryURLs


#: The HTTP client a registry client sends with: blocking or asyncio.
_HTTP = TypeVar("_HTTP", httpx.Client, httpx.AsyncClient)
_Self = TypeVar("_Self", bound="_Base[Any]")


class _Base(Generic[_HTTP]):
    def __init__(
        self,
        url: RegistryAt,
        *,
        svid_dir: str | None = None,
        bundle_pem: bytes | None = None,
        timeout: float = 5.0,
        source: SVIDSource | None = None,
        max_connections: int = CALL_CONNECTIONS,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
        #: The registry URLs and the current one (shared when given as a RegistryURLs).
        self.registry = url if isinstance(url, RegistryURLs) else RegistryURLs(url)
        self.timeout = timeout
        #: The client's SVID (None: a bootstrap client, which presents none).
        self.source: SVIDSource | None = None
        self.check: ServerCheck
        if sum(x is not None for x in (svid_dir, bundle_pem, source)) != 1:
            raise ValueError(
                "give exactly one of svid_dir or source (mTLS) or bundle_pem (bootstrap)"
            )
        if svid_dir is not None:
            source = SVIDSource(svid_dir)
        if source is not None:
            # A live source (the mesh's, reloaded as the SVID rotates and renews): each new
            # connection presents the SVID loaded now, never one that expired meanwhile.
            self.source = source
            self.check = _RegistryCheck(source)
            context = source.client_context()
        else:
            assert bundle_pem is not None
            self.check = _bootstrap_check(bundle_pem)
            context = self.check.client_context()
        self.calls = _Calls()
        #: The pool of calls that are not blocking queries (at most ``max_connections``).
        calls = httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=CLIENT_KEEP_ALIVE,
        )
        self._http: _HTTP = self._open(context, calls)
        #: One connection per held long-poll (a workload watches every declared service): no
        #: cap to queue a watch behind the others, and every one kept alive, so a re-poll
        #: reuses its connection instead of a new mutual-TLS handshake.
        self._held_http: _HTTP = self._open(context, _WATCH_LIMITS)

    def _open(self, context: ssl.SSLContext, limits: httpx.Limits) -> _HTTP:
        """An HTTP client on a pinned transport (this server check) with ``limits``."""
        raise NotImplementedError

    @classmethod
    def for_bootstrap(
        cls: type[_Self], url: RegistryAt, *, bundle_pem: bytes, timeout: float = 5.0
    ) -> _Self:
        """A client without an SVID, for a first contact with a join token (:meth:`sign`):
        TLS verifying the registry against ``bundle_pem`` (a bundle file's text) and pinning
        its SPIFFE ID; it presents no certificate."""
        return cls(url, bundle_pem=bundle_pem, timeout=timeout)

    @property
    def url(self) -> str:
        """The registry URL the next call goes to first."""
        return self.registry.url

    @property
    def urls(self) -> tuple[str, ...]:
        return self.registry.urls

    def _request(
        self, client: httpx.Client | httpx.AsyncClient, url: str, call: _Call[Any]
    ) -> httpx.Request:
        timeout = httpx.Timeout(self.timeout, read=self.timeout + call.hold)
        return client.build_request(
            call.method,
            url + call.path,
            params=call.params,
            json=call.json,
            content=call.content,
            headers=dict(call.headers),
            extensions={"timeout": timeout.as_dict()},
        )

    def _answer(self, call: _Call[T], url: str, response: httpx.Response) -> T:
        """Read ``url``'s answer; a 503 (the registry is there but cannot serve: no quorum,
        shutting down) moves the client on for its next call."""
        if response.status_code == 503:
            self.registry.failed(url, "503")
        else:
            self.registry.answered()
        return self._read(call, response)

    def _failed(self, call: _Call[Any], url: str, exc: httpx.HTTPError) -> RegistryUnavailable:
        """A failure of the transport at ``url`` (a timeout, a reset): the client moves on for
        its next call, and this one fails (its outcome is unknown: it may have been served)."""
        self.registry.failed(url, exc)
        return _unavailable(call, exc, url if len(self.registry.urls) > 1 else None)

    def _unreachable(
        self, call: _Call[Any], failures: list[tuple[str, httpx.HTTPError]]
    ) -> RegistryUnavailable:
        """Every URL refused the connection (or its handshake)."""
        if len(failures) == 1:
            return _unavailable(call, failures[0][1])
        said = "; ".join(f"{url}: {exc}" for url, exc in failures)
        return RegistryUnavailable(0, f"{call.method} {call.path}: no registry reachable ({said})")

    @staticmethod
    def _read(call: _Call[T], response: httpx.Response) -> T:
        if response.status_code == 404 and call.missing is not None:
            return call.missing()
        _check(response)
        try:
            return call.read(response)
        except (WireError, KeyError, TypeError, ValueError) as exc:
            raise RegistryError(
                response.status_code, f"answer to {call.method} {call.path} is malformed: {exc}"
            ) from None


def _unavailable(
    call: _Call[Any], exc: httpx.HTTPError, url: str | None = None
) -> RegistryUnavailable:
    at = "" if url is None else f" at {url}"
    return RegistryUnavailable(0, f"{call.method} {call.path}{at}: {exc}")


class RegistryClient(_Base[httpx.Client]):
    """The registry's API, blocking (one method per endpoint; see the module docstring)."""

    def _open(self, context: ssl.SSLContext, limits: httpx.Limits) -> httpx.Client:
        transport = PinnedTransport(context, self.check, limits=limits)
        return httpx.Client(transport=transport, trust_env=False)

    def _send(self, call: _Call[T]) -> T:
        url = self.registry.url
        failures: list[tuple[str, httpx.HTTPError]] = []
        for _ in self.registry.urls:  # each URL at most once per call
            try:
                http = self._held_http if call.hold else self._http
                response = http.send(self._request(http, url, call))
            except _NOT_SENT as exc:  # never sent: the next URL, at once
                self.registry.failed(url, exc)
                failures.append((url, exc))
                url = self.registry.after(url)
                continue
            except httpx.HTTPError as exc:
                raise self._failed(call, url, exc) from exc
            return self._answer(call, url, response)
        raise self._unreachable(call, failures) from failures[-1][1]

    def register(
        self,
        namespace: str,
        service: str,
        address: str,
        port: int,
        *,
        labels: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        ttl: float | None = None,
    ) -> Registered:
        call = self.calls.register(
            namespace, service, address, port, labels=labels, metrics_port=metrics_port, ttl=ttl
        )
        return self._send(call)

    def heartbeat(
        self,
        namespace: str,
        service: str,
        id: str,
        *,
        applied_version: int | None = None,
        rejected_version: int | None = None,
        error: str | None = None,
    ) -> float:
        call = self.calls.heartbeat(
            namespace,
            service,
            id,
            applied_version=applied_version,
            rejected_version=rejected_version,
            error=error,
        )
        return self._send(call)

    def deregister(self, namespace: str, service: str, id: str) -> int | None:
        return self._send(self.calls.deregister(namespace, service, id))

    def instances(self) -> tuple[InstanceInfo, ...]:
        return self._send(self.calls.instances())

    def services(self) -> tuple[ServiceInfo, ...]:
        return self._send(self.calls.services())

    def endpoints(
        self,
        namespace: str,
        service: str,
        *,
        index: int = 0,
        wait: float | None = None,
        epoch: str | None = None,
    ) -> EndpointsAnswer:
        call = self.calls.endpoints(namespace, service, index=index, wait=wait, epoch=epoch)
        return self._send(call)

    def policy(
        self, *, index: int = 0, wait: float | None = None, epoch: str | None = None
    ) -> PolicyAnswer:
        call = self.calls.policy(index=index, wait=wait, epoch=epoch)
        return self._send(call)

    def apply(
        self, text: str, *, if_match: int | None = None, source: str | None = None
    ) -> Applied:
        call = self.calls.apply(text, if_match=if_match, source=source)
        return self._send(call)

    def history(self) -> tuple[PolicyAnswer, ...]:
        return self._send(self.calls.history())

    def version(self, version: int) -> PolicyAnswer:
        return self._send(self.calls.version(version))

    def rollback(self, version: int, *, if_match: int | None = None) -> Applied:
        call = self.calls.rollback(version, if_match=if_match)
        return self._send(call)

    def bundle(
        self, *, index: int = 0, wait: float | None = None, epoch: str | None = None
    ) -> BundleAnswer:
        """The CA's trust bundle and CRLs; with ``index`` (and the answer's ``epoch``), held
        until they change or ``wait`` seconds pass."""
        return self._send(self.calls.bundle(index=index, wait=wait, epoch=epoch))

    def prometheus_sd(self) -> list[dict[str, Any]]:
        return self._send(self.calls.prometheus_sd())

    def status(self) -> RegistryStatusInfo:
        return self._send(self.calls.status())

    def create_token(self, spiffe_id: str, *, ttl: float | None = None) -> TokenIssued:
        """A one-time join token for ``spiffe_id`` (admin only); ``ttl`` seconds, default 15 min."""
        return self._send(self.calls.create_token(spiffe_id, ttl=ttl))

    def tokens(self) -> tuple[TokenInfo, ...]:
        """Every join token the registry keeps, with its state (admin only)."""
        return self._send(self.calls.tokens())

    def revoke_token(self, id: str) -> float:
        """Revoke join token ``id``; returns when it was revoked (admin only)."""
        return self._send(self.calls.revoke_token(id))

    def sign(self, csr_pem: bytes | str, token: str | None = None) -> Signed:
        """A leaf for the CSR's key: for the join token's identity with ``token``, else for
        this client's SVID's (renewal)."""
        return self._send(self.calls.sign(csr_pem, token))

    def close(self) -> None:
        self._http.close()
        self._held_http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRegistryClient(_Base[httpx.AsyncClient]):
    """The registry's API for asyncio (the same methods as :class:`RegistryClient`)."""

    def _open(self, context: ssl.SSLContext, limits: httpx.Limits) -> httpx.AsyncClient:
        transport = AsyncPinnedTransport(context, self.check, limits=limits)
        return httpx.AsyncClient(transport=transport, trust_env=False)

    async def _send(self, call: _Call[T]) -> T:
        url = self.registry.url
        failures: list[tuple[str, httpx.HTTPError]] = []
        for _ in self.registry.urls:  # each URL at most once per call
            try:
                http = self._held_http if call.hold else self._http
                response = await http.send(self._request(http, url, call))
            except _NOT_SENT as exc:  # never sent: the next URL, at once
                self.registry.failed(url, exc)
                failures.append((url, exc))
                url = self.registry.after(url)
                continue
            except httpx.HTTPError as exc:
                raise self._failed(call, url, exc) from exc
            return self._answer(call, url, response)
        raise self._unreachable(call, failures) from failures[-1][1]

    async def register(
        self,
        namespace: str,
        service: str,
        address: str,
        port: int,
        *,
        labels: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        ttl: float | None = None,
    ) -> Registered:
        call = self.calls.register(
            namespace, service, address, port, labels=labels, metrics_port=metrics_port, ttl=ttl
        )
        return await self._send(call)

    async def heartbeat(
        self,
        namespace: str,
        service: str,
        id: str,
        *,
        applied_version: int | None = None,
        rejected_version: int | None = None,
        error: str | None = None,
    ) -> float:
        call = self.calls.heartbeat(
            namespace,
            service,
            id,
            applied_version=applied_version,
            rejected_version=rejected_version,
            error=error,
        )
        return await self._send(call)

    async def deregister(self, namespace: str, service: str, id: str) -> int | None:
        return await self._send(self.calls.deregister(namespace, service, id))

    async def instances(self) -> tuple[InstanceInfo, ...]:
        return await self._send(self.calls.instances())

    async def services(self) -> tuple[ServiceInfo, ...]:
        return await self._send(self.calls.services())

    async def endpoints(
        self,
        namespace: str,
        service: str,
        *,
        index: int = 0,
        wait: float | None = None,
        epoch: str | None = None,
    ) -> EndpointsAnswer:
        call = self.calls.endpoints(namespace, service, index=index, wait=wait, epoch=epoch)
        return await self._send(call)

    async def policy(
        self, *, index: int = 0, wait: float | None = None, epoch: str | None = None
    ) -> PolicyAnswer:
        call = self.calls.policy(index=index, wait=wait, epoch=epoch)
        return await self._send(call)

    async def apply(
        self, text: str, *, if_match: int | None = None, source: str | None = None
    ) -> Applied:
        call = self.calls.apply(text, if_match=if_match, source=source)
        return await self._send(call)

    async def history(self) -> tuple[PolicyAnswer, ...]:
        return await self._send(self.calls.history())

    async def version(self, version: int) -> PolicyAnswer:
        return await self._send(self.calls.version(version))

    async def rollback(self, version: int, *, if_match: int | None = None) -> Applied:
        call = self.calls.rollback(version, if_match=if_match)
        return await self._send(call)

    async def bundle(
        self, *, index: int = 0, wait: float | None = None, epoch: str | None = None
    ) -> BundleAnswer:
        return await self._send(self.calls.bundle(index=index, wait=wait, epoch=epoch))

    async def prometheus_sd(self) -> list[dict[str, Any]]:
        return await self._send(self.calls.prometheus_sd())

    async def status(self) -> RegistryStatusInfo:
        return await self._send(self.calls.status())

    async def create_token(self, spiffe_id: str, *, ttl: float | None = None) -> TokenIssued:
        return await self._send(self.calls.create_token(spiffe_id, ttl=ttl))

    async def tokens(self) -> tuple[TokenInfo, ...]:
        return await self._send(self.calls.tokens())

    async def revoke_token(self, id: str) -> float:
        return await self._send(self.calls.revoke_token(id))

    async def sign(self, csr_pem: bytes | str, token: str | None = None) -> Signed:
        """As :meth:`RegistryClient.sign`."""
        return await self._send(self.calls.sign(csr_pem, token))

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._held_http.aclose()

    async def __aenter__(self) -> AsyncRegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
