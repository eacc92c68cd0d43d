"""The Observe pillar's tools: call-completion events and what consumes them (the access log,
the tap, top, the admin app), the metrics exporters and the service graph.

One event per outbound call and per inbound request is built only when a consumer is attached
(``mesh.events`` is ``None`` otherwise, and the hooks in the call sequence and the middleware
stop at that check). See docs/features/access-logs.md and docs/features/admin.md.
"""

from meshlib.observe.events import CallEvent, EventHub, Flag, attach, detach, flag_for

__all__ = ["CallEvent", "EventHub", "Flag", "attach", "detach", "flag_for"]
