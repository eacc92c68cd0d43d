"""The two drivers of the call sequence: an httpx sync transport and an httpx async transport.

Each one resolves the host; mesh services go through :func:`meshlib.outbound.call.run_call`, whose
effects the driver performs; other hosts go straight to the inner transport. A failure leaves
both through :func:`_failed`: a sidecar-style local response, or the exception with a note on
what failed. The two classes are meant to be read side by side: they differ only in ``await``
and in how they race hedges (a thread pool here, an anyio task group there).
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Generator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from meshlib.decision import Decision
from meshlib.errors import MeshError, Reason, annotate, describe
from meshlib.outbound.call import (
    STREAM_EXTENSION,
    Buffer,
    Close,
    Effect,
    Mirror,
    Outcome,
    Race,
    RaceResult,
    Send,
    Sleep,
    local_response,
)
from meshlib.outbound.egress import pass_through_hint, unresolved
from meshlib.outbound.pools import EndpointPools, PoolKey

if TYPE_CHECKING:
    import asyncio

#: Threads for hedged attempts per sync transport (created lazily, only when hedging is on).
HEDGE_WORKERS = 64

#: Mirrored requests in flight per transport; more are dropped, never queued (mirroring must
#: not add latency or memory to the primary traffic).
MAX_MIRRORS_IN_FLIGHT = 32


class CallStarter(Protocol):
    """What a transport needs from the mesh it drives calls for (:class:`meshlib.Mesh`)."""

    def clock(self) -> float: ...

    def start_call(self, request: httpx.Request) -> Generator[Effect, Any, httpx.Response] | None:
        """The call sequence for ``request``; None for a host outside the mesh."""

    def mtls_transport(self, limits: httpx.Limits | None = None) -> httpx.BaseTransport:
        """The sync inner transport for attempts over mutual TLS."""

    def async_mtls_transport(self, limits: httpx.Limits | None = None) -> httpx.AsyncBaseTransport:
        """The async inner transport for attempts over mutual TLS."""

    def close_service(self, host: str) -> str | None:
        """The mesh service a host outside the mesh was probably meant to name, or None."""


def _one_tls_context(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``httpx.HTTPTransport`` keyword arguments with ``verify``/``cert`` turned into the one
    SSL context httpx would build from them: every endpoint's pool shares it instead of
    loading the CA bundle again per endpoint."""
    shared = {k: v for k, v in kwargs.items() if k != "cert"}
    shared["verify"] = httpx.create_ssl_context(
        verify=kwargs.get("verify", True),
        cert=kwargs.get("cert"),
        trust_env=kwargs.get("trust_env", True),
    )
    return shared


def _address(request: httpx.Request) -> str:
    """The ``host:port`` a mirrored copy is aimed at (an attempt's comes with its endpoint),
    the scheme's default port spelled out as the endpoint's address has it (httpx drops it)."""
    url = request.url
    return f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"


def _mirror_ended(
    mirror: Mirror, response: httpx.Response | None, error: BaseException | None
) -> None:
    """Tell the mirror's observer (tracing) how the copy ended."""
    if mirror.observe is not None:
        mirror.observe(response, error)


def _failed(
    mesh: CallStarter, request: httpx.Request, error: Exception, local: bool
) -> httpx.Response | None:
    """How a failed call leaves its transport: the local response that answers it (with
    ``local_responses``), or None and ``error`` is re-raised, a note naming the service, the
    endpoints tried, the attempts and the reason. Only failures get here: nothing of this is
    looked up for a call that succeeds."""
    decision: Decision | None = getattr(error, "decision", None)
    if decision is None and not isinstance(error, MeshError):
        # A host outside the mesh, passed through: not a mesh call, never a local response.
        if isinstance(error, httpx.ConnectError) and unresolved(error):
            host = request.url.host
            hint = pass_through_hint(host, mesh.close_service(host))
            if hint is not None:
                annotate(error, hint)
        return None
    if local:
        if isinstance(error, MeshError):
            decision = decision or Decision(request.url.host, 0)
            return local_response(request, error.status, error.reason, decision)
        # The upstream's own failure after the last attempt (connect_failure or reset): Envoy
        # answers both (UF, UR) with a local 503.
        assert decision is not None
        return local_response(request, 503, Reason(decision.reason), decision)
    if decision is not None:
        annotate(error, describe(decision))
    return None


class MeshClient(httpx.Client):
    """The ``httpx.Client`` of ``mesh.client()``: marks the calls whose response its caller
    streams (``client.stream``, ``send(stream=True)``), because the transport cannot tell them
    apart from buffered ones. A streamed call's deadline ends at the response headers; a
    buffered call's covers the whole body (:class:`meshlib.outbound.call.Body`)."""

    def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        # httpx's own keywords spelled out, not **kwargs: no dict packed and unpacked per call
        if stream:
            request.extensions[STREAM_EXTENSION] = True
        return super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)


class AsyncMeshClient(httpx.AsyncClient):
    """The ``httpx.AsyncClient`` of ``mesh.async_client()``; see :class:`MeshClient`."""

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        if stream:
            request.extensions[STREAM_EXTENSION] = True
        return await super().send(
            request, stream=stream, auth=auth, follow_redirects=follow_redirects
        )


class MeshTransport(httpx.BaseTransport):
    """Sync driver. Without ``inner``, each endpoint of a mesh service gets its own
    ``httpx.HTTPTransport`` (its own connection pool, :mod:`meshlib.outbound.pools`), built on
    first use from ``**kwargs`` (verify, cert, limits, http1, http2, trust_env, ...), so a
    client's TLS and pool settings still apply when the mesh is plugged in; ``limits`` then
    bound the connections *per endpoint* (as Envoy's per-host pools), and hosts outside the
    mesh share one more such transport. With ``inner``, every plain request goes through that
    one transport. Attempts over the mesh's mTLS get a pool per endpoint either way, with the
    same ``limits``."""

    def __init__(
        self,
        mesh: CallStarter,
        inner: httpx.BaseTransport | None = None,
        *,
        local_responses: bool = False,
        **kwargs: Any,
    ) -> None:
        self._mesh = mesh
        self._own_inner = inner is None
        if inner is None:
            kwargs = _one_tls_context(kwargs)
            inner = httpx.HTTPTransport(**kwargs)
        self._inner = inner  # hosts outside the mesh (and mesh endpoints, if the user's)
        self._inner_kwargs = kwargs
        self._local_responses = local_responses
        self._limits: httpx.Limits | None = kwargs.get("limits")
        self._pools = EndpointPools[httpx.BaseTransport](self._build_pool)
        self._pool: ThreadPoolExecutor | None = None
        # Mirrors get their own threads: a slow or hanging shadow must never occupy the
        # workers that primary (hedged) attempts need.
        self._mirror_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._mirrors = threading.BoundedSemaphore(MAX_MIRRORS_IN_FLIGHT)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            call = self._mesh.start_call(request)
            if call is None:
                return self._inner.handle_request(request)
            return self._drive(call)
        except (MeshError, httpx.TransportError) as error:
            reply = _failed(self._mesh, request, error, self._local_responses)
            if reply is None:
                raise
            return reply

    def _drive(self, call: Generator[Effect, Any, httpx.Response]) -> httpx.Response:
        try:
            effect = call.send(None)
            while True:
                kind = type(effect)
                result: Any = None
                if kind is Send:
                    result = self._send(effect)  # type: ignore[arg-type]
                elif kind is Sleep:
                    time.sleep(effect.seconds)  # type: ignore[union-attr]
                elif kind is Close:
                    effect.response.close()  # type: ignore[union-attr]
                elif kind is Buffer:
                    effect.request.read()  # type: ignore[union-attr]
                elif kind is Race:
                    result = self._race(effect)  # type: ignore[arg-type]
                elif kind is Mirror:
                    self._mirror(effect)  # type: ignore[arg-type]
                effect = call.send(result)
        except StopIteration as stop:
            response: httpx.Response = stop.value
            return response
        finally:
            call.close()

    def _send(self, send: Send) -> Outcome:
        clock = self._mesh.clock
        start = clock()
        try:
            response = self._handle(send.request, send.tls, send.state.address)
        except httpx.TransportError as error:
            return Outcome(None, error, clock() - start)
        return Outcome(response, None, clock() - start)

    def _handle(self, request: httpx.Request, tls: bool, address: str) -> httpx.Response:
        """Send an attempt (its URL aimed at the endpoint ``address``) through the endpoint's
        pool: over the mesh's mTLS if the call sequence decided so (the URL is then
        ``https``)."""
        if not (tls or self._own_inner):
            return self._inner.handle_request(request)
        pool, evicted = self._pools.lease((tls, address))
        try:  # the lease ends even if closing an evicted pool raises (as the async _handle)
            for transport in evicted:
                transport.close()
            return pool.transport.handle_request(request)
        finally:
            self._pools.release(pool)

    def _build_pool(self, key: PoolKey) -> httpx.BaseTransport:
        if key[0]:
            return self._mesh.mtls_transport(self._limits)
        return httpx.HTTPTransport(**self._inner_kwargs)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                # Hedged attempts run here: each hedged call holds up to two workers while
                # its caller waits, so the pool is sized for many concurrent hedged calls.
                self._pool = ThreadPoolExecutor(
                    max_workers=HEDGE_WORKERS, thread_name_prefix="meshlib-hedge"
                )
            return self._pool

    def _mirror_executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._mirror_pool is None:
                self._mirror_pool = ThreadPoolExecutor(
                    max_workers=MAX_MIRRORS_IN_FLIGHT, thread_name_prefix="meshlib-mirror"
                )
            return self._mirror_pool

    def _race(self, race: Race) -> RaceResult:
        pool = self._executor()
        # Each attempt runs in a copy of the caller's context (tracing's, for one).
        first = pool.submit(contextvars.copy_context().run, self._send, race.first)
        done, _ = wait([first], timeout=race.delay)
        if done:
            return RaceResult(race.first, first.result())
        second = race.backup()
        if second is None:
            return RaceResult(race.first, first.result())
        second_future = pool.submit(contextvars.copy_context().run, self._send, second)
        sends = {first: race.first, second_future: second}
        pending: set[Future[Outcome]] = set(sends)
        finished: list[tuple[Send, Outcome]] = []
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            finished.extend((sends[f], f.result()) for f in done)
            accepted = [item for item in finished if race.accept(item[1])]
            if not accepted and pending:
                continue
            win_send, win_outcome = accepted[0] if accepted else finished[-1]
            if pending:
                # A thread cannot be interrupted: the loser is closed when it completes.
                loser_future = pending.pop()
                loser_future.add_done_callback(_close_outcome)
                return RaceResult(win_send, win_outcome, sends[loser_future], None)
            lose_send, lose_outcome = next(i for i in finished if i[0] is not win_send)
            if lose_outcome.response is not None:
                lose_outcome.response.close()
            return RaceResult(win_send, win_outcome, lose_send, lose_outcome)
        raise AssertionError("unreachable: race ended without an outcome")

    def _mirror(self, mirror: Mirror) -> None:
        if not self._mirrors.acquire(blocking=False):
            _mirror_ended(mirror, None, None)  # dropped: too many copies in flight
            return
        try:
            self._mirror_executor().submit(
                contextvars.copy_context().run, self._send_mirror, mirror
            )
        except RuntimeError:  # executor shut down
            self._mirrors.release()
            _mirror_ended(mirror, None, None)

    def _send_mirror(self, mirror: Mirror) -> None:
        response = None
        failure: BaseException | None = None
        try:
            response = self._handle(mirror.request, mirror.tls, _address(mirror.request))
            try:
                response.read()
            finally:
                response.close()
        except httpx.HTTPError as error:
            # a mirror's failure is nobody's business but its own span's
            response, failure = None, error
        except BaseException as error:
            response, failure = None, error
            raise
        finally:
            self._mirrors.release()
            _mirror_ended(mirror, response, failure)

    def close(self) -> None:
        with self._pool_lock:
            pools = (self._pool, self._mirror_pool)
            self._pool = self._mirror_pool = None
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._inner.close()
        for transport in self._pools.drain():
            transport.close()


def _close_outcome(future: Future[Outcome]) -> None:
    outcome = future.result()
    if outcome.response is not None:
        outcome.response.close()


class AsyncMeshTransport(httpx.AsyncBaseTransport):
    """Async driver (asyncio or trio through anyio). Same effects, awaited; the same pools
    per endpoint as :class:`MeshTransport` (``httpx.AsyncHTTPTransport`` ones)."""

    def __init__(
        self,
        mesh: CallStarter,
        inner: httpx.AsyncBaseTransport | None = None,
        *,
        local_responses: bool = False,
        **kwargs: Any,
    ) -> None:
        self._mesh = mesh
        self._own_inner = inner is None
        if inner is None:
            kwargs = _one_tls_context(kwargs)
            inner = httpx.AsyncHTTPTransport(**kwargs)
        self._inner = inner
        self._inner_kwargs = kwargs
        self._local_responses = local_responses
        self._limits: httpx.Limits | None = kwargs.get("limits")
        self._pools = EndpointPools[httpx.AsyncBaseTransport](self._build_pool)
        self._mirror_tasks: set[asyncio.Task[None]] = set()  # strong refs until done

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            call = self._mesh.start_call(request)
            if call is None:
                return await self._inner.handle_async_request(request)
            return await self._drive(call)
        except (MeshError, httpx.TransportError) as error:
            reply = _failed(self._mesh, request, error, self._local_responses)
            if reply is None:
                raise
            return reply

    async def _drive(self, call: Generator[Effect, Any, httpx.Response]) -> httpx.Response:
        try:
            effect = call.send(None)
            while True:
                kind = type(effect)
                result: Any = None
                if kind is Send:
                    result = await self._send(effect)  # type: ignore[arg-type]
                elif kind is Sleep:
                    import anyio  # here, so that `import meshlib` loads no async machinery

                    await anyio.sleep(effect.seconds)  # type: ignore[union-attr]
                elif kind is Close:
                    await effect.response.aclose()  # type: ignore[union-attr]
                elif kind is Buffer:
                    await effect.request.aread()  # type: ignore[union-attr]
                elif kind is Race:
                    result = await self._race(effect)  # type: ignore[arg-type]
                elif kind is Mirror:
                    self._mirror(effect)  # type: ignore[arg-type]
                effect = call.send(result)
        except StopIteration as stop:
            response: httpx.Response = stop.value
            return response
        finally:
            call.close()

    async def _send(self, send: Send) -> Outcome:
        clock = self._mesh.clock
        start = clock()
        try:
            response = await self._handle(send.request, send.tls, send.state.address)
        except httpx.TransportError as error:
            return Outcome(None, error, clock() - start)
        return Outcome(response, None, clock() - start)

    async def _handle(self, request: httpx.Request, tls: bool, address: str) -> httpx.Response:
        if not (tls or self._own_inner):
            return await self._inner.handle_async_request(request)
        pool, evicted = self._pools.lease((tls, address))
        try:
            for transport in evicted:
                await transport.aclose()
            return await pool.transport.handle_async_request(request)
        finally:
            self._pools.release(pool)

    def _build_pool(self, key: PoolKey) -> httpx.AsyncBaseTransport:
        if key[0]:
            return self._mesh.async_mtls_transport(self._limits)
        return httpx.AsyncHTTPTransport(**self._inner_kwargs)

    async def _race(self, race: Race) -> RaceResult:
        import anyio

        sender, receiver = anyio.create_memory_object_stream[tuple[Send, Outcome]](2)

        async def attempt(send: Send) -> None:
            outcome = await self._send(send)
            sender.send_nowait((send, outcome))

        result: RaceResult | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt, race.first)
            with anyio.move_on_after(race.delay):
                send, outcome = await receiver.receive()
                result = RaceResult(send, outcome)
            if result is None:
                second = race.backup()
                if second is None:
                    send, outcome = await receiver.receive()
                    result = RaceResult(send, outcome)
                else:
                    tg.start_soon(attempt, second)
                    send, outcome = await receiver.receive()
                    other = second if send is race.first else race.first
                    if race.accept(outcome):
                        result = RaceResult(send, outcome, other, None)
                    else:
                        send2, outcome2 = await receiver.receive()
                        if outcome.response is not None:
                            await outcome.response.aclose()
                        result = RaceResult(send2, outcome2, send, outcome)
            tg.cancel_scope.cancel()  # the loser's connection is closed by the cancellation
        assert result is not None
        # An attempt that finished while being cancelled: close what nobody will read.
        while True:
            try:
                _, stray = receiver.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            if stray.response is not None and stray is not result.outcome:
                await stray.response.aclose()
                if result.loser_outcome is None:
                    result.loser_outcome = stray
        sender.close()
        receiver.close()
        return result

    def _mirror(self, mirror: Mirror) -> None:
        import asyncio

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # not on asyncio (e.g. trio): mirroring is skipped, never blocks the call
            _mirror_ended(mirror, None, None)
            return
        if len(self._mirror_tasks) >= MAX_MIRRORS_IN_FLIGHT:
            _mirror_ended(mirror, None, None)
            return
        task = loop.create_task(self._send_mirror(mirror))
        self._mirror_tasks.add(task)
        task.add_done_callback(self._mirror_tasks.discard)

    async def _send_mirror(self, mirror: Mirror) -> None:
        response = None
        failure: BaseException | None = None
        try:
            response = await self._handle(mirror.request, mirror.tls, _address(mirror.request))
            try:
                await response.aread()
            finally:
                await response.aclose()
        except httpx.HTTPError as error:
            response, failure = None, error
        except BaseException as error:  # cancelled (the transport closing): ended all the same
            response, failure = None, error
            raise
        finally:
            _mirror_ended(mirror, response, failure)

    async def aclose(self) -> None:
        for task in list(self._mirror_tasks):
            task.cancel()
        self._mirror_tasks.clear()
        await self._inner.aclose()
        for transport in self._pools.drain():
            await transport.aclose()
