"""Serve an ASGI app under uvicorn with the mesh's mutual TLS, and tell the app who called.

No ASGI server fills the ASGI TLS extension (``scope["extensions"]["tls"]``) today, so
:func:`serve` runs uvicorn with its own h11 protocol class. When a TLS connection is made it
reads the peer certificate from the ``ssl_object`` (only the leaf on Python < 3.13 through the
public API; the verified chain is read where the interpreter offers it), re-checks it as an
X.509 SVID of the mesh's trust domain against the current bundle (OpenSSL verified the chain
and the dates; the SPIFFE shape and trust domain are meshlib's), and then either

* refuses the connection (closes it, logging the reason on ``meshlib.serving``), or
* injects the extension into every scope the connection makes, where
  :class:`~meshlib.inbound.MeshMiddleware` reads the caller's identity.

Modes (``mode=`` pins one; by default the effective mode of the mesh's own service,
``mesh.mtls_mode()``: a namespace or service TrafficPolicy ``mtls.mode``, else
``Mesh.spec.mtls``, followed across policy reloads):

* ``strict``: a verified client certificate is required. Pinned, the TLS handshake itself
  requires one; followed, the server asks for one and refuses plaintext connections and
  certificate-less TLS connections itself (and, on a connection opened while the mode was
  permissive, answers each request 403 with reason ``unauthenticated``);
* ``permissive``: TLS with an optional client certificate *and* plain HTTP on the same port
  (the first byte of a connection tells them apart); callers without a certificate are served
  as unauthenticated;
* ``disable``: plain HTTP, no TLS extension. A server started under ``disable`` stays plain:
  TLS needs an SVID and a TLS listener, so turning mTLS on for it means a restart.

A flip strict → permissive → strict therefore needs no new socket and never fails a request
from a meshed client (one that presents its SVID).

``client_cert="optional"`` (with a TLS mode) makes a server that is **TLS only, client
certificate optional, the app decides**: plain HTTP is refused as under strict, the handshake
asks for a client certificate without requiring one, and a request without one reaches the app
with no client certificate in its TLS extension (so ``verified_identity`` is ``None``) — the app
refuses what needs an identity. The registry serves this way: a workload's first contact has a
join token, not yet an SVID (docs/control-plane.md, "The API").

In both TLS modes a client that *does* present a certificate must present a valid SVID of the
trust domain, or the connection is refused: a peer that claims an identity and gets it wrong is
misconfigured or hostile, never silently downgraded.

Whatever the mode, requests are parsed by meshlib's h11 protocol class, which refuses what
h11 alone lets through: a request carrying both ``Content-Length`` and ``Transfer-Encoding`` is
answered 400 and its connection closed before any app sees it (RFC 9112 §6.3; otherwise a
request hidden after the chunked body would be served on the same connection — request
smuggling). h11 itself refuses the other ambiguous framings with 400 and a close.

Stopping (:meth:`Server.stop`) closes idle keep-alive connections at once — over TLS too, where
the server sends its ``close_notify`` and closes without waiting for the peer's (a pooled HTTP
client never reads an idle connection, so it would never answer) — and gives in-flight requests
a grace period (``timeout_graceful_shutdown``, default :data:`SHUTDOWN_GRACE` seconds) to finish
with ``Connection: close``; what is left after it is cancelled and its connection aborted.
Callers' next calls open new connections, to whatever listens then.

A mesh that keeps a registry (DESIGN.md §8) registers the served instance: once the server
listens, :func:`serve` calls the mesh's optional ``on_serving(host, port, scheme)``
(:class:`ServingHook`) with the address callers reach (``advertise``, else ``host``) and the
real port, and :meth:`Server.stop` closes what it returned *first*, before the listener: the
instance leaves the registry (callers stop picking it) while it still answers those already
on their way, and only then does the port go away.

Imports of uvicorn, asyncio, h11 and the identity package happen on first use, so
``import meshlib`` stays light.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import asyncio
    import ssl

    import h11
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from meshlib.config.model import MTLSMode, Snapshot
    from meshlib.identity.rotation import RotationStatus, RotationWatcher
    from meshlib.identity.tls import SVIDMaterial, SVIDSource

__all__ = ["Closeable", "Server", "ServingHook", "run", "serve", "tls_extension"]

log = logging.getLogger("meshlib.serving")


class CertMetrics(Protocol):
    """Where the served SVID's expiry is reported (:class:`meshlib.observe.metrics.MeshMetrics`)."""

    def set_cert_expiry(self, identity: str, timestamp: float) -> None: ...


class ServedMesh(Protocol):
    """What serving needs from the mesh (:class:`meshlib.Mesh`): the mTLS mode in force, the
    current policy (its trust domain, read per connection) and its metrics."""

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def metrics(self) -> CertMetrics | None: ...

    def mtls_mode(self, service_key: str | None = None) -> MTLSMode: ...


class Closeable(Protocol):
    """What :meth:`Server.stop` closes first (a registration handle, whose close drains)."""

    def close(self) -> object: ...


@runtime_checkable
class ServingHook(Protocol):
    """The optional part of a :class:`ServedMesh`, checked at run time so a mesh (or a test's
    fake) without it serves as before: told where the server listens once it does, it returns
    what to close when the server stops (``None``: nothing, e.g. a mesh without a registry)."""

    def on_serving(self, host: str, port: int, scheme: str) -> Closeable | None: ...


Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]

#: Seconds a new connection may stay silent before its first byte says TLS or plain HTTP.
SNIFF_TIMEOUT = 10.0
#: Seconds in-flight requests get to finish once :meth:`Server.stop` is called (uvicorn's
#: ``timeout_graceful_shutdown``; pass that keyword to :func:`serve` to change it).
SHUTDOWN_GRACE = 2.0
#: Seconds :meth:`Server.stop` allows beyond the grace for uvicorn's own shutdown steps.
STOP_MARGIN = 3.0

_TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class Server:
    """A running server (from :func:`serve`); :meth:`stop` or leaving ``with`` shuts it down."""

    def __init__(
        self,
        server: uvicorn.Server,
        thread: threading.Thread,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        mode: MTLSMode,
        svid: SVIDSource | None,
    ) -> None:
        self.server = server
        self.host = host
        self.port = port
        self.mode = mode
        #: The SVID served (``None`` when mode is ``disable``).
        self.svid = svid
        self._thread = thread
        self._loop = loop
        self._rotation: RotationWatcher | None = None
        #: What the mesh's :class:`ServingHook` returned: closed first by :meth:`stop`.
        self._registration: Closeable | None = None

    @property
    def svid_status(self) -> RotationStatus | None:
        """The SVID rotation state (see :class:`meshlib.identity.rotation.RotationStatus`);
        ``None`` without TLS or with ``svid_poll_interval=None``."""
        return None if self._rotation is None else self._rotation.status

    @property
    def url(self) -> str:
        scheme = "http" if self.svid is None else "https"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def reload_svid(self, timeout: float = 10.0) -> bool:
        """Re-read the SVID files; swap the new pair in (for new connections) only if it
        validates. ``True`` if a new pair is now served, ``False`` if unchanged; raises
        :class:`~meshlib.identity.IdentityError` if refused, and the old pair stays live.
        Runs on the server's event loop so no handshake sees a half-loaded context."""
        import asyncio

        if self.svid is None:
            raise RuntimeError("this server does not use TLS (mode is 'disable')")
        svid = self.svid

        async def reload() -> bool:
            return svid.reload()

        return asyncio.run_coroutine_threadsafe(reload(), self._loop).result(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; close idle connections at once; let in-flight requests finish
        within the grace period (then cancel them and abort their connections); join.

        ``timeout`` (seconds; default: the grace plus :data:`STOP_MARGIN`) bounds the whole
        stop: :class:`TimeoutError` if the server thread is still running after it.

        First of all it closes what the mesh's ``on_serving`` returned (the registry drain):
        callers learn the instance is leaving while it still accepts their calls."""
        registration, self._registration = self._registration, None
        if registration is not None:
            try:
                registration.close()  # bounded by the registrar's own drain timeout
            except Exception:  # a failed drain must not keep the server up: the TTL removes it
                log.exception("stopping %s: the registry drain failed", self.url)
        if self._rotation is not None:
            self._rotation.stop()
        if timeout is None:
            grace = self.server.config.timeout_graceful_shutdown
            timeout = (SHUTDOWN_GRACE if grace is None else grace) + STOP_MARGIN
        self.server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"server on {self.url} did not stop within {timeout}s")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<meshlib.Server {self.url} mode={self.mode.value}>"


def serve(
    app: ASGIApp,
    *,
    mesh: ServedMesh,
    host: str = "127.0.0.1",
    port: int = 0,
    svid_dir: str | None = None,
    mode: MTLSMode | str | None = None,
    startup_timeout: float = 10.0,
    svid_poll_interval: float | None = 1.0,
    advertise: str | None = None,
    client_cert: str = "mode",
    **uvicorn_kwargs: Any,
) -> Server:
    """Run ``app`` under uvicorn on a background thread; return once it listens.

    ``port=0`` picks a free port (see :attr:`Server.port`). ``svid_dir`` holds ``cert.pem``,
    ``key.pem`` and ``bundle.pem`` (``meshctl ca issue --out``); required unless the mode is
    ``disable``. The SVID directory is polled every ``svid_poll_interval`` seconds (``None``:
    never) and a renewed pair is swapped in on the server's loop
    (:mod:`meshlib.identity.rotation`). Extra keyword arguments go to :class:`uvicorn.Config`.

    ``client_cert``: ``"mode"`` (the default) requires or tolerates a client certificate as the
    mode says; ``"optional"`` serves TLS only with an optional client certificate whatever the
    mode, leaving the decision to the app (see the module docstring).

    When the mesh has an ``on_serving`` hook (:class:`ServingHook`: a mesh with a registry
    registers the instance there), it is called once the server listens, with ``advertise``
    (the address callers reach; default ``host``, which must then not be a wildcard such as
    ``0.0.0.0``), the real port and the scheme; :meth:`Server.stop` closes its result first.
    If the hook raises, the server is stopped and the error propagates.
    """
    import asyncio

    server, source, resolved = _build(
        app, mesh, host, port, svid_dir, mode, uvicorn_kwargs, client_cert
    )
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        state["loop"] = asyncio.get_running_loop()
        config = server.config
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup()
        except SystemExit:  # uvicorn exits when it cannot bind
            state["error"] = RuntimeError(f"uvicorn could not listen on {host}:{port}")
        except BaseException as exc:  # pragma: no cover - reported to the caller
            state["error"] = exc
        if "error" in state or server.should_exit:
            state.setdefault("error", RuntimeError("uvicorn did not start"))
            started.set()
            return
        state["port"] = int(server.servers[0].sockets[0].getsockname()[1])
        started.set()
        await server.main_loop()
        await server.shutdown()  # idle connections close now, in-flight ones get the grace
        # What the grace left open (a response never finished, a peer that never closed) is
        # cut, so no socket outlives the server's loop.
        for connection in list(server.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()

    def target() -> None:
        try:
            asyncio.run(main())
        finally:
            started.set()

    thread = threading.Thread(target=target, name=f"meshlib-serve-{host}:{port}", daemon=True)
    thread.start()
    if not started.wait(startup_timeout):
        server.should_exit = True
        raise TimeoutError(f"server did not start within {startup_timeout}s")
    if "port" not in state:
        thread.join(startup_timeout)
        raise state.get("error") or RuntimeError("uvicorn did not start")
    running = Server(server, thread, state["loop"], host, state["port"], resolved, source)
    if source is not None and svid_poll_interval is not None:
        from meshlib.identity.rotation import RotationWatcher

        metrics = mesh.metrics

        def on_reload(material: SVIDMaterial) -> None:
            if metrics is not None:
                expiry = material.certificate.not_valid_after_utc.timestamp()
                metrics.set_cert_expiry(str(material.spiffe_id), expiry)

        running._rotation = RotationWatcher(
            source,
            reload=running.reload_svid,
            poll_interval=svid_poll_interval,
            on_reload=on_reload,
        ).start()
    if isinstance(mesh, ServingHook):
        scheme = "http" if source is None else "https"
        try:
            running._registration = mesh.on_serving(advertise or host, running.port, scheme)
        except BaseException:
            running.stop()
            raise
    return running


def run(
    app: ASGIApp,
    *,
    mesh: ServedMesh,
    host: str = "127.0.0.1",
    port: int = 8000,
    svid_dir: str | None = None,
    mode: MTLSMode | str | None = None,
    client_cert: str = "mode",
    **uvicorn_kwargs: Any,
) -> None:
    """Like :func:`serve`, but blocking in the calling thread (for scripts; handles Ctrl-C)."""
    server, _, _ = _build(app, mesh, host, port, svid_dir, mode, uvicorn_kwargs, client_cert)
    server.run()


def _build(
    app: ASGIApp,
    mesh: ServedMesh,
    host: str,
    port: int,
    svid_dir: str | None,
    mode: MTLSMode | str | None,
    uvicorn_kwargs: dict[str, Any],
    client_cert: str = "mode",
) -> tuple[uvicorn.Server, SVIDSource | None, MTLSMode]:
    import uvicorn

    from meshlib.config.model import MTLSMode

    resolved = MTLSMode(mode) if mode is not None else mesh.mtls_mode()
    if client_cert not in ("mode", "optional"):
        raise ValueError(f"client_cert must be 'mode' or 'optional', got {client_cert!r}")
    optional = client_cert == "optional"
    if optional and resolved is MTLSMode.DISABLE:
        raise ValueError("client_cert='optional' needs TLS: the mTLS mode is 'disable'")
    options: dict[str, Any] = {
        "log_config": None,
        "lifespan": "auto",
        "timeout_graceful_shutdown": SHUTDOWN_GRACE,  # uvicorn's default waits forever
    }
    options.update(uvicorn_kwargs)
    source: SVIDSource | None = None
    if resolved is not MTLSMode.DISABLE:
        if "http" in options:  # the TLS protocol is meshlib's: it cannot be swapped out
            raise ValueError(f"mTLS mode {resolved.value!r}: uvicorn's http= cannot be given")
        if svid_dir is None:
            raise ValueError(
                f"mTLS mode {resolved.value!r} needs svid_dir (cert.pem, key.pem, ...)"
            )
        from meshlib.identity.tls import SVIDSource

        source = SVIDSource(svid_dir, trust_domain=mesh.snapshot.mesh.trust_domain)
        # Pinned strict: the handshake itself requires a certificate. Otherwise the mode may
        # change under a live socket, so a certificate is requested, not required, and strict
        # is enforced per connection and per request (see _sniffing_protocol).
        pinned_strict = mode is not None and resolved is MTLSMode.STRICT
        context = source.server_context(require_client_cert=pinned_strict and not optional)
        mode_of = (lambda: resolved) if mode is not None else mesh.mtls_mode
        if optional:
            # TLS only (the sniffer refuses plaintext as under strict), while the connection
            # and its requests are served as under permissive: no certificate is no refusal.
            # The per-request code is the same; only what the mode reads as differs.
            tls_class = _protocol_class(source, mode_of=lambda: MTLSMode.PERMISSIVE, mesh=mesh)
            options["http"] = _sniffing_protocol(tls_class, context, lambda: MTLSMode.STRICT)
        else:
            tls_class = _protocol_class(source, mode_of=mode_of, mesh=mesh)
            options["http"] = _sniffing_protocol(tls_class, context, mode_of)
    else:
        options.setdefault("http", _protocol_class())
    config = uvicorn.Config(app, host=host, port=port, **options)
    config.load()
    return uvicorn.Server(config), source, resolved


def _protocol_class(
    source: SVIDSource | None = None,
    *,
    mode_of: Callable[[], MTLSMode] | None = None,
    mesh: ServedMesh | None = None,
) -> type[H11Protocol]:
    """uvicorn's h11 protocol as :func:`serve` runs it: requests parsed with
    :func:`_framing_checked_connection`, and a stop that closes idle connections at once and
    asks for ``Connection: close`` on the responses it still waits for.

    With ``source`` (TLS modes, under :func:`_sniffing_protocol`) it also checks the peer's SVID
    and fills the ASGI TLS extension, and refuses requests without a verified client
    certificate while the mode is strict."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from meshlib.config.model import MTLSMode

    class MeshH11Protocol(H11Protocol):
        def __init__(self, *args: Any, tcp: asyncio.Transport | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.conn = _framing_checked_connection(self.config.h11_max_incomplete_event_size)
            #: The socket's own transport under asyncio's TLS layer (``None``: plain HTTP,
            #: where ``self.transport`` is the socket's).
            self.tcp = tcp
            self.draining = False

        def shutdown(self) -> None:
            self.draining = True
            cycle = self.cycle
            idle = cycle is None or cycle.response_complete
            if not idle and not cycle.response_started:
                # The response still to come says the connection ends with it (RFC 9112
                # section 9.6), so the caller does not send its next request here. A new list:
                # the default headers are shared by every connection.
                cycle.default_headers = [*cycle.default_headers, (b"connection", b"close")]
            super().shutdown()  # idle: closes now; else after the response
            if idle:
                self._close_socket()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.draining:  # uvicorn closed the connection after this response
                self._close_socket()

        def _close_socket(self) -> None:
            """Under TLS, closing writes our close_notify and then waits for the peer's, which
            a caller's pooled, idle connection never sends (nothing reads it): close the
            socket without waiting, as RFC 8446 section 6.1 allows. The close_notify and any
            response bytes still buffered are flushed first."""
            if self.tcp is not None:
                self.tcp.close()

    if source is None:
        return MeshH11Protocol
    assert mode_of is not None and mesh is not None
    svid, current_mode, own_mesh = source, mode_of, mesh  # narrowed, for the closures below
    strict = MTLSMode.STRICT

    class MeshTLSProtocol(MeshH11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            tls: dict[str, Any] | None = None
            if ssl_object is not None:
                try:
                    tls = tls_extension(
                        ssl_object,
                        svid,
                        trust_domain=own_mesh.snapshot.mesh.trust_domain,  # per connection: reloads
                        require_client_cert=current_mode() is strict,
                    )
                except PeerRefused as exc:
                    peer = f"{self.client[0]}:{self.client[1]}" if self.client else "unknown peer"
                    log.warning("mTLS: refused connection from %s: %s", peer, exc.reason)
                    transport.abort()
                    return
            verified = tls is not None and bool(tls["client_cert_chain"])
            inner = self.app

            async def with_tls(scope: Scope, receive: Any, send: Any) -> None:
                if scope.get("type") in ("http", "websocket"):
                    if not verified and current_mode() is strict:  # the mode became strict
                        await _refuse_unverified(scope, send)
                        return
                    if tls is not None:
                        scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls}
                await inner(scope, receive, send)

            self.app = with_tls
            upgraded = self.ws_protocol_class
            if upgraded is not None:
                # uvicorn hands a WebSocket upgrade to a new protocol that runs the config's
                # app, not this connection's: without this, a handshake would reach the app
                # without the TLS extension (no caller identity) and skip the strict check.
                def ws_protocol(**kwargs: Any) -> asyncio.Protocol:
                    protocol = upgraded(**kwargs)
                    protocol.app = with_tls  # type: ignore[attr-defined]
                    return protocol

                self.ws_protocol_class = ws_protocol  # type: ignore[assignment]

    return MeshTLSProtocol


def _framing_checked_connection(max_incomplete_event_size: int | None) -> h11.Connection:
    """A server-side h11 connection that also refuses a request with both ``Content-Length``
    and ``Transfer-Encoding``, which h11 reads as chunked and keeps the connection for."""
    import h11

    size = max_incomplete_event_size
    cls = _framing_checked_class()
    return cls(h11.SERVER) if size is None else cls(h11.SERVER, size)


@functools.cache
def _framing_checked_class() -> type[h11.Connection]:
    import h11

    class FramingChecked(h11.Connection):
        def next_event(self) -> Any:
            event = super().next_event()
            if type(event) is h11.Request and _ambiguous_framing(event.headers.raw_items()):
                # uvicorn answers a RemoteProtocolError with 400 and closes the connection,
                # before the request (or anything hidden after its body) reaches the app.
                raise h11.RemoteProtocolError(
                    "both Content-Length and Transfer-Encoding (RFC 9112 section 6.3)"
                )
            return event

    return FramingChecked


def _ambiguous_framing(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request's headers carry both framings (``Content-Length`` and
    ``Transfer-Encoding``): the one a front proxy used may not be the one read here."""
    length = chunked = False
    for name, _ in headers:
        size = len(name)  # a length test first: most headers are neither
        if size == 14 and name.lower() == b"content-length":
            length = True
        elif size == 17 and name.lower() == b"transfer-encoding":
            chunked = True
    return length and chunked


async def _refuse_unverified(scope: Scope, send: Any) -> None:
    """403 (reason ``unauthenticated``) for a request without a verified client certificate
    on a connection opened before the mode turned strict; a WebSocket is closed instead."""
    from meshlib.errors import Reason
    from meshlib.inbound.middleware import send_local_reply

    log.warning("mTLS strict: refused a request without a client certificate")
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send_local_reply(send, 403, Reason.UNAUTHENTICATED)


def _sniffing_protocol(
    tls_class: Callable[..., asyncio.Protocol],
    context: ssl.SSLContext,
    mode_of: Callable[[], MTLSMode],
) -> type[asyncio.Protocol]:
    """A protocol that looks at a connection's first byte: a TLS handshake record (0x16) is
    handed to an asyncio TLS layer over ``tls_class``; anything else is plain HTTP, served by
    ``tls_class`` without TLS unless the mode is strict, when the connection is closed.

    One port thus serves both while the mode is permissive (Istio PERMISSIVE semantics), and
    a mode change needs no new socket. A peer that sends nothing is dropped after
    ``SNIFF_TIMEOUT`` seconds, or when the server stops: until its first byte, the connection
    is one of uvicorn's (``server_state.connections``), idle, so a stop closes it at once.
    """
    import asyncio
    from asyncio.sslproto import SSLProtocol

    from meshlib.config.model import MTLSMode

    class Sniffer(asyncio.Protocol):
        def __init__(self, **kwargs: Any) -> None:
            self._kwargs = kwargs
            self._connections: set[Any] = kwargs["server_state"].connections
            self.transport: asyncio.Transport | None = None
            self._timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self._connections.add(self)
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(SNIFF_TIMEOUT, transport.abort)

        def connection_lost(self, exc: Exception | None) -> None:
            self._connections.discard(self)
            if self._timer is not None:
                self._timer.cancel()

        def shutdown(self) -> None:
            """uvicorn's stop: nothing was received, so there is nothing to finish."""
            if self.transport is not None:
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            transport = self.transport
            assert transport is not None
            self._connections.discard(self)  # the HTTP protocol now answers for it
            if self._timer is not None:
                self._timer.cancel()
            if data[:1] == b"\x16":  # a TLS record of type handshake
                self._start_tls(transport, data)
                return
            if mode_of() is MTLSMode.STRICT:
                peer = transport.get_extra_info("peername")
                log.warning("mTLS strict: refused a plaintext connection from %s", peer)
                transport.abort()
                return
            app = tls_class(**self._kwargs)
            transport.set_protocol(app)
            app.connection_made(transport)
            app.data_received(data)

        def _start_tls(self, transport: asyncio.Transport, data: bytes) -> None:
            """Put asyncio's TLS layer between the socket and the HTTP protocol, as
            ``loop.start_tls`` does, and replay the bytes already read into it."""
            # typeshed's stub lags CPython: no waiter is needed when nobody awaits the handshake
            tls = SSLProtocol(
                asyncio.get_running_loop(),
                tls_class(**self._kwargs, tcp=transport),
                context,
                None,  # type: ignore[arg-type]
                server_side=True,
            )
            transport.set_protocol(tls)
            tls.connection_made(transport)
            if not isinstance(tls, asyncio.BufferedProtocol):  # Python 3.10
                tls.data_received(data)
                return
            view = memoryview(data)  # 3.11+: SSLProtocol is a BufferedProtocol
            while view:
                buffer = memoryview(tls.get_buffer(len(view)))
                n = min(len(buffer), len(view))
                buffer[:n] = view[:n]
                tls.buffer_updated(n)
                view = view[n:]

    return Sniffer


class PeerRefused(Exception):
    """The peer's certificate is not acceptable; ``.reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def tls_extension(
    ssl_object: ssl.SSLObject,
    source: SVIDSource,
    *,
    trust_domain: str,
    require_client_cert: bool,
) -> dict[str, Any]:
    """The ASGI TLS extension for an established connection, after checking the peer's SVID
    against ``source``'s current bundle; :class:`PeerRefused` if it must be refused."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from meshlib.identity.svid import SVIDError, verify_svid
    from meshlib.identity.tls import peer_chain

    leaf_der = ssl_object.getpeercert(binary_form=True)
    chain_pem: list[str] = []
    name: str | None = None
    if leaf_der is None:
        if require_client_cert:
            raise PeerRefused("no client certificate (mTLS mode strict)")
    else:
        chain = [x509.load_der_x509_certificate(der) for der in peer_chain(ssl_object, leaf_der)]
        try:
            verify_svid(chain, source.bundle, trust_domain=trust_domain, crls=source.crls)
        except SVIDError as exc:
            raise PeerRefused(exc.reason) from None
        chain_pem = [chain[0].public_bytes(serialization.Encoding.PEM).decode("ascii")]
        name = chain[0].subject.rfc4514_string()
    cipher = ssl_object.cipher()
    return {
        "server_cert": source.material.certificate.public_bytes(serialization.Encoding.PEM).decode(
            "ascii"
        ),
        "client_cert_chain": chain_pem,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _cipher_id(ssl_object.context, cipher[0]) if cipher else None,
    }


def _cipher_id(context: ssl.SSLContext, name: str) -> int | None:
    for info in context.get_ciphers():
        if info.get("name") == name:
            return int(info["id"]) & 0xFFFF
    return None
