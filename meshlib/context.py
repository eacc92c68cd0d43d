"""Request-scoped context that crosses from the inbound side to outbound calls, and the header
that carries a deadline from a caller to its upstream.

The inbound middleware sets these for the duration of one request; outbound calls made while
handling it (in the handler, in tasks it spawns, in threads started with context-copying
helpers such as ``asyncio.to_thread`` or ``contextvars.copy_context().run``) read them with no
application code.
"""

from __future__ import annotations

from contextvars import ContextVar

#: Header telling the upstream how much of the caller's deadline is left, in milliseconds
#: (written by the call sequence, read by the inbound middleware of the next hop).
DEADLINE_HEADER = "x-mesh-timeout-ms"

#: Absolute deadline (``time.monotonic()`` seconds) of the inbound request being handled, if
#: the caller propagated one. Outbound calls never get more time than is left of it.
inbound_deadline: ContextVar[float | None] = ContextVar("meshlib_inbound_deadline", default=None)
