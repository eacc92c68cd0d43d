"""The mesh's tracing hook: nothing until OpenTelemetry is in the process, then its tracing.

:class:`~meshlib.mesh.Mesh` holds a :class:`TracingHook`, never OpenTelemetry itself. While
``opentelemetry.context`` has not been imported by anyone, there is nothing to record or carry:
no SDK provider can have been set (``trace.set_tracer_provider`` imports it), no context can be
current (attaching one imports it), and no propagator can have been configured in code. So a
call goes out untouched and OpenTelemetry (≈ 0.8 MB, 9 ms) is not loaded. Once it is imported —
an SDK set up before or after the mesh was built, instrumentation, an incoming W3C trace context
(below) — the hook loads :class:`meshlib.observe.tracing.Tracing` and from then on hands every
call straight to it (its bound methods replace the hook's own: no extra call per request).

Two things reach OpenTelemetry without an import: the environment (``OTEL_PYTHON_TRACER_PROVIDER``
names a provider the API loads by itself, ``OTEL_PROPAGATORS`` replaces the propagators), looked
at when the mesh is built and then at most every :data:`RECHECK` seconds; and an inbound request
carrying a header of OpenTelemetry's default propagators (``traceparent``, ``tracestate``,
``baggage``), which must be extracted and carried on even without an SDK.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Generator

    import httpx
    from opentelemetry.trace import TracerProvider

    from meshlib.config.model import MeshSettings, ServiceDef
    from meshlib.errors import MeshError
    from meshlib.observe.tracing import InboundTrace, Tracing
    from meshlib.outbound.call import Effect

    Call = Generator[Effect, Any, httpx.Response]

Scope = MutableMapping[str, Any]

#: Seconds between two looks at the environment while OpenTelemetry is not loaded (as
#: ``tracing.GLOBAL_RECHECK`` for the global provider once it is).
RECHECK = 1.0
#: Imported by every part of OpenTelemetry's API that can hold a span, a context or a provider.
_CONTEXT_MODULE = "opentelemetry.context"
#: Variables through which OpenTelemetry is configured without being imported.
_ENVIRONMENT = ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PROPAGATORS")
#: The headers OpenTelemetry's default propagators (``tracecontext,baggage``) read, as ASGI
#: spells them; any other propagator is set in code (an import) or by ``OTEL_PROPAGATORS``.
_DEFAULT_FIELDS = frozenset({b"traceparent", b"tracestate", b"baggage"})


class TracingHook:
    """A mesh's tracing: a no-op while OpenTelemetry is absent, then a :class:`Tracing`.

    The arguments are :class:`Tracing`'s, kept until it is built. ``trace_call``, ``refused``
    and ``inbound`` are the hook's own until then, the tracing's bound methods after.
    """

    trace_call: Callable[[Call, httpx.Request, ServiceDef], Call]
    refused: Callable[[httpx.Request, MeshError], None]
    inbound: Callable[[Scope], InboundTrace | None]

    def __init__(
        self,
        provider: TracerProvider | None,
        settings: Callable[[], MeshSettings],
        clock: Callable[[], float],
        seed: int | None = None,
    ) -> None:
        self._args = (provider, settings, clock, seed)
        self._tracing: Tracing | None = None
        self._lock = threading.Lock()
        self._recheck = 0.0  # monotonic time of the next look at the environment
        self.trace_call = self._trace_call
        self.refused = self._refused
        self.inbound = self._inbound
        if provider is not None:  # an explicit provider: OpenTelemetry is already imported
            self.tracing()
        else:
            self.active()

    def active(self) -> Tracing | None:
        """The tracing, built now if OpenTelemetry has been imported or configured by the
        environment since the last look; ``None`` while there is nothing to trace."""
        tracing = self._tracing
        if tracing is not None:
            return tracing
        if _CONTEXT_MODULE not in sys.modules:
            now = time.monotonic()
            if now < self._recheck:
                return None
            self._recheck = now + RECHECK
            if not any(name in os.environ for name in _ENVIRONMENT):
                return None
        return self.tracing()

    def tracing(self) -> Tracing:
        """The tracing, built (and OpenTelemetry's API imported) on the first use."""
        with self._lock:  # one Tracing per mesh, whichever thread gets here first
            tracing = self._tracing
            if tracing is None:
                from meshlib.observe.tracing import Tracing

                tracing = self._tracing = Tracing(*self._args)
                self.trace_call = tracing.trace_call
                self.refused = tracing.refused
                self.inbound = tracing.inbound
            return tracing

    def _trace_call(self, call: Call, request: httpx.Request, service: ServiceDef) -> Call:
        tracing = self.active()
        return call if tracing is None else tracing.trace_call(call, request, service)

    def _refused(self, request: httpx.Request, error: MeshError) -> None:
        tracing = self.active()
        if tracing is not None:
            tracing.refused(request, error)

    def _inbound(self, scope: Scope) -> InboundTrace | None:
        tracing = self.active()
        if tracing is None:
            for name, _ in scope.get("headers") or ():
                if name in _DEFAULT_FIELDS:  # a trace context to carry on, SDK or not
                    return self.tracing().inbound(scope)
            return None
        return tracing.inbound(scope)
