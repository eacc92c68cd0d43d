"""Rate limits at the ingress gateway: a token bucket per client IP and per end user (the JWT
subject the edge verified), a bounded number of each, and the 429 a refused request gets.

The keys are only what the gateway can vouch for:

* the **client IP** is :func:`meshlib.gateway.edge.client_address` — the socket peer, or with
  ``trusted_hops`` the ``x-forwarded-for`` entry that many trusted proxies put left of it; an
  address a client writes into a header beyond those hops is never a key, else a client could
  pick a fresh bucket per request;
* the **subject** is the request principal (``iss/sub``) of a token the gateway's
  :class:`~meshlib.inbound.MeshMiddleware` verified (RequestAuthentication of the gateway's own
  Service), read from ``scope["extensions"]["meshlib"]``, which only that middleware writes. A
  token is never parsed here: an unverified ``sub`` is the client's word. A request without a
  verified token has no subject and only its IP's bucket applies.

A request takes a token from its IP's bucket, then from its subject's, so a subject refused
after the IP admitted it has cost that IP one token (both are the same client's requests). Each
kind keeps at most ``max_keys`` buckets, the least recently used forgotten first (as the
middleware's ``max_identities``): a forgotten key starts again from a full bucket, which is the
price of bounded memory under a spray of addresses.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from meshlib.config.model import RateLimitPolicy
from meshlib.errors import REASON_HEADER, Reason
from meshlib.gateway.edge import client_address
from meshlib.policy.ratelimit import KeyedLimiter, rate_limit_policy

__all__ = [
    "MAX_KEYS",
    "EdgeRateLimits",
    "KeyedLimiter",
    "RateRefusal",
    "parse_rate",
    "verified_subject",
]

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

log = logging.getLogger("meshlib.gateway")

#: Bound on the buckets of one key kind (client IPs, or subjects).
MAX_KEYS = 10_000

_RATE = re.compile(
    r"^\s*(?P<n>[0-9]+(?:\.[0-9]+)?)\s*/\s*(?P<unit>s|m|h)\s*(?::\s*(?P<burst>[0-9]+))?\s*$"
)
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> RateLimitPolicy:
    """``"100/s"``, ``"20/s:40"``, ``"600/m"``: requests per second (or minute, hour) and an
    optional burst (default: one second's worth, at least 1). ValueError names what is wrong."""
    match = _RATE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a rate: expected N/s, N/m or N/h, optionally :BURST")
    rate = float(match["n"]) / _UNIT[match["unit"]]
    if not rate > 0:
        raise ValueError(f"{text!r}: the rate must be above 0")
    burst = int(match["burst"]) if match["burst"] is not None else max(1, math.ceil(rate))
    if burst < 1:
        raise ValueError(f"{text!r}: the burst must be at least 1")
    return RateLimitPolicy(requests_per_second=rate, burst=burst)


def _policy(
    value: RateLimitPolicy | tuple[float, int] | str | None, name: str
) -> RateLimitPolicy | None:
    return rate_limit_policy(parse_rate(value) if isinstance(value, str) else value, name)


@dataclass(frozen=True)
class RateRefusal:
    """A request over a limit: which kind (``client-ip`` or ``subject``), and Retry-After."""

    kind: str
    retry_after: int


def verified_subject(scope: Mapping[str, Any]) -> str | None:
    """The request principal (``iss/sub``) of the token the edge middleware verified, or None
    (no RequestAuthentication applies, or no token came)."""
    extensions = scope.get("extensions") or {}
    verified = extensions.get("meshlib") if isinstance(extensions, Mapping) else None
    if not isinstance(verified, Mapping):
        return None
    principal = verified.get("request_principal")
    return principal if isinstance(principal, str) and principal else None


class EdgeRateLimits:
    """The gateway's per-client-IP and per-subject limits (see the module docstring).

    ``per_ip`` and ``per_subject`` are a :class:`~meshlib.config.model.RateLimitPolicy`,
    ``(requests_per_second, burst)`` or a rate text (:func:`parse_rate`); None: no such limit.
    ``clock`` is the mesh's (seconds, monotonic)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        per_ip: RateLimitPolicy | tuple[float, int] | str | None = None,
        per_subject: RateLimitPolicy | tuple[float, int] | str | None = None,
        max_keys: int = MAX_KEYS,
    ) -> None:
        ip_policy = _policy(per_ip, "per_ip")
        subject_policy = _policy(per_subject, "per_subject")
        self.clock = clock
        self.per_ip = None if ip_policy is None else KeyedLimiter(ip_policy, max_keys)
        self.per_subject = (
            None if subject_policy is None else KeyedLimiter(subject_policy, max_keys)
        )
        self._lock = threading.Lock()  # the app may be served from several threads' loops

    @property
    def active(self) -> bool:
        return self.per_ip is not None or self.per_subject is not None

    def admit(self, client: str | None, subject: str | None) -> RateRefusal | None:
        """Take a token for a request from ``client`` (its address; None: unknown, not
        limited by address) by ``subject`` (None: no verified token); the refusal, if any."""
        now = self.clock()
        with self._lock:
            ip = self.per_ip
            if ip is not None and client is not None and not ip.take(client, now):
                return RateRefusal("client-ip", ip.retry_after())
            user = self.per_subject
            if user is not None and subject is not None and not user.take(subject, now):
                return RateRefusal("subject", user.retry_after())
        return None

    async def refuse(self, scope: Mapping[str, Any], send: Send, trusted_hops: int = 0) -> bool:
        """Admit the request of ``scope`` or answer it **429** ``rate_limited`` with
        ``Retry-After`` (True: answered, do not forward)."""
        peer = scope.get("client")
        client = client_address(
            scope.get("headers") or (), str(peer[0]) if peer else None, trusted_hops
        )
        subject = verified_subject(scope)
        refusal = self.admit(client, subject)
        if refusal is None:
            return False
        who = client if refusal.kind == "client-ip" else subject
        log.info("rate limited at the edge: %s %s", refusal.kind, who)
        body = f"{Reason.RATE_LIMITED.value}: over the per-{refusal.kind} rate limit\n".encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
            (REASON_HEADER.encode("ascii"), Reason.RATE_LIMITED.value.encode("ascii")),
            (b"retry-after", str(refusal.retry_after).encode("ascii")),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return True
