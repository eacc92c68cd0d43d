"""Edge hygiene for requests entering the mesh through the gateway: which headers from outside
are dropped, the ``forwarded`` / ``x-forwarded-*`` headers the gateway sets, the request limits
and the framing rules. Pure functions over ASGI-style raw headers, no I/O.

Trust model: a client of the gateway is never a mesh member. What the mesh believes from a
header is re-derived at the edge, never taken from outside:

* **mesh-only headers** are dropped (:func:`mesh_only_header`): the identity claims and
  control prefixes of :mod:`meshlib.inbound.peer` (``x-mesh-identity``, the deadline
  ``x-mesh-timeout-ms``, the reason ``x-mesh-reason``, ``x-forwarded-client-cert``,
  ``x-meshlib-*``, ``x-mesh-*``, ``l5d-*``, ``x-envoy-*``, underscore spellings of them), the
  header names that FaultInjection rules match (a stranger must not trigger a fault meant for a
  test user; the app passes them from the snapshot, :func:`fault_header_names`), and, unless the
  gateway is told to continue traces from outside, the trace context (``traceparent``, ...: an
  outsider could otherwise force sampling or join internal traces);
* **hop-by-hop headers** (RFC 9110 §7.6.1) and those named in ``Connection`` are dropped: the
  outbound leg frames its own request;
* **forwarding** follows Envoy's ``use_remote_address: true`` (an edge proxy):
  ``x-forwarded-for`` and ``forwarded`` are *appended* to (the chain a client sends is kept for
  the backend to read, the gateway's entry naming the peer it saw is last and the only one it
  vouches for); ``x-forwarded-proto`` and ``x-forwarded-host`` are *replaced* by the scheme of
  the listener and the Host received, since a value from an untrusted client would lie about
  the connection (``x-forwarded-port`` and ``x-real-ip`` from such a client are dropped too).
  With ``trusted_hops`` > 0 (Envoy's ``xff_num_trusted_hops``: that many proxies
  of your own stand in front of the gateway), incoming ``x-forwarded-proto`` and
  ``x-forwarded-host`` are kept and :func:`client_address` reads that many entries further left.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass

from meshlib.config.model import FaultRule, HeaderModifier
from meshlib.errors import Reason
from meshlib.inbound.peer import sanitize_headers
from meshlib.policy.routes import edit_headers

__all__ = [
    "DEFAULT_LIMITS",
    "HOP_BY_HOP",
    "TRACE_CONTEXT_HEADERS",
    "Downstream",
    "EdgeLimits",
    "Refusal",
    "body_refusal",
    "check_request",
    "client_address",
    "edge_headers",
    "fault_header_names",
    "forwarded_element",
    "head_refusal",
    "mesh_only_header",
    "relayed_headers",
]

Headers = list[tuple[bytes, bytes]]

#: RFC 9110 §7.6.1 hop-by-hop fields, plus the obsolete ``proxy-connection``.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Never removed because ``Connection`` names them: the request needs them end to end.
_END_TO_END = frozenset({"host", "content-length", "content-type"})
#: What tracing propagators read (W3C, B3, Jaeger): stripped unless traces continue from outside.
TRACE_CONTEXT_HEADERS = frozenset(
    {
        "traceparent",
        "tracestate",
        "baggage",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
        "uber-trace-id",
    }
)
#: Claims about the connection that only a trusted proxy may make: from an untrusted client they
#: are dropped; the gateway sets x-forwarded-proto and x-forwarded-host itself.
_FORWARDING = frozenset({"x-forwarded-proto", "x-forwarded-host", "x-forwarded-port", "x-real-ip"})


@dataclass(frozen=True)
class EdgeLimits:
    """Request limits at the edge. Defaults follow Envoy's HTTP connection manager where it has
    one (``max_request_headers_kb`` 60, ``max_headers_count`` 100); the URL limit is RFC 9112
    §3's "at least 8000 octets" rounded up to 8 KiB (nginx's ``large_client_header_buffers``);
    the body limit is generous for uploads (nginx's ``client_max_body_size`` is 1 MiB: set
    yours). ``None`` disables a limit."""

    #: Sum over header fields of name + value + 4 (": " and CRLF, as on the wire).
    max_header_bytes: int | None = 60 * 1024
    max_header_count: int | None = 100
    #: Path plus ``?`` and query string, as received (still percent-encoded).
    max_url_length: int | None = 8 * 1024
    max_body_bytes: int | None = 16 * 1024 * 1024
    #: A WebSocket message (all its frames), either way: the ``websockets`` library's default.
    max_websocket_message_bytes: int | None = 1024 * 1024


DEFAULT_LIMITS = EdgeLimits()


@dataclass(frozen=True)
class Refusal:
    """The gateway's local answer to a request it will not forward."""

    status: int  # 400, 413, 414 or 431
    detail: str  # for the client and the access log; never echoes header values
    reason: Reason = Reason.BAD_REQUEST  # Envoy's DPE: a downstream protocol error


@dataclass(frozen=True)
class Downstream:
    """What the gateway saw of the connection: the peer's address (ASGI ``scope["client"]``),
    the listener's scheme and the Host (or ``:authority``) received."""

    peer: str | None
    scheme: str  # "http" or "https"
    host: str | None


def fault_header_names(rules: Iterable[FaultRule]) -> frozenset[str]:
    """The header names FaultInjection rules match on: mesh-only at the edge."""
    return frozenset(name.lower() for rule in rules for name in rule.headers)


def mesh_only_header(
    name: str, also: frozenset[str] = frozenset(), *, trust_trace_context: bool = False
) -> bool:
    """Whether a header ``name`` arriving from outside is dropped (see the module docstring)."""
    raw = name.encode("latin-1")
    lowered = name.lower()
    if not sanitize_headers([(raw, b"")], None):
        return True
    return lowered in also or (not trust_trace_context and lowered in TRACE_CONTEXT_HEADERS)


def _connection_tokens(headers: Sequence[tuple[bytes, bytes]]) -> set[str]:
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.decode("latin-1").split(","))
    tokens.discard("")
    return tokens - _END_TO_END


def relayed_headers(
    raw: Iterable[tuple[bytes, bytes]], drop: Set[str], edits: Sequence[HeaderModifier]
) -> Headers:
    """A backend's response headers as the client gets them: those whose (lower-case) name is
    in ``drop`` left out, then the route's ResponseHeaderModifiers ``edits`` applied."""
    out = [(name, value) for name, value in raw if name.lower().decode("latin-1") not in drop]
    if not edits:
        return out
    edited = edit_headers([(n.decode("latin-1"), v.decode("latin-1")) for n, v in out], edits)
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in edited]


def edge_headers(
    headers: Sequence[tuple[bytes, bytes]],
    downstream: Downstream,
    *,
    also_strip: frozenset[str] = frozenset(),
    trusted_hops: int = 0,
    trust_trace_context: bool = False,
    keep_upgrade: bool = False,
) -> Headers:
    """The headers to send into the mesh for a request that arrived from outside with
    ``headers``: mesh-only and hop-by-hop headers dropped, forwarding headers set. Order of
    the kept headers is preserved; the gateway's own forwarding headers come last.
    ``keep_upgrade`` keeps ``upgrade`` and ``connection: upgrade`` (a WebSocket handshake)."""
    # Identity claims and control headers: the inbound side's rules for a non-member.
    kept = sanitize_headers(headers, None)
    nominated = _connection_tokens(headers)
    hop = HOP_BY_HOP
    if keep_upgrade:
        hop = HOP_BY_HOP - {"upgrade", "connection"}
        nominated.discard("upgrade")  # "Connection: Upgrade" names the header it keeps
    drop = hop | nominated | also_strip
    if not trust_trace_context:
        drop = drop | TRACE_CONTEXT_HEADERS
    if trusted_hops == 0:
        drop = drop | _FORWARDING
    out: Headers = []
    incoming_xff: list[str] = []
    incoming_forwarded: list[str] = []
    for name, value in kept:
        lowered = name.lower().decode("latin-1")
        if lowered == "x-forwarded-for":
            incoming_xff.append(value.decode("latin-1"))
            continue
        if lowered == "forwarded":
            incoming_forwarded.append(value.decode("latin-1"))
            continue
        if lowered in drop:
            continue
        if keep_upgrade and lowered == "connection":
            value = b"upgrade"  # only the upgrade token survives the hop
        out.append((name, value))
    present = {name.lower() for name, _ in out}
    xff = [e for e in (s.strip() for v in incoming_xff for s in v.split(",")) if e]
    if downstream.peer is not None:
        xff.append(downstream.peer)
    if xff:
        out.append((b"x-forwarded-for", ", ".join(xff).encode("latin-1")))
    if b"x-forwarded-proto" not in present:
        out.append((b"x-forwarded-proto", downstream.scheme.encode("latin-1")))
    if b"x-forwarded-host" not in present and downstream.host is not None:
        out.append((b"x-forwarded-host", downstream.host.encode("latin-1")))
    # A client's Forwarded that does not parse is dropped rather than appended to: a broken
    # prefix would make the gateway's own element unreadable.
    chain = ", ".join(incoming_forwarded)
    elements = [chain] if chain and _FORWARDED.fullmatch(chain) else []
    elements.append(forwarded_element(downstream))
    out.append((b"forwarded", ", ".join(elements).encode("latin-1")))
    return out


def client_address(
    headers: Sequence[tuple[bytes, bytes]], peer: str | None, trusted_hops: int = 0
) -> str | None:
    """The address the gateway attributes a request to (per-client rate limits, logs): the
    peer itself with no trusted hops; else the ``x-forwarded-for`` entry ``trusted_hops``
    places left of the peer (Envoy: the Nth address from the right of the incoming XFF), or
    the leftmost when the chain is shorter."""
    if trusted_hops <= 0:
        return peer
    chain = [
        e.strip()
        for name, value in headers
        if name.lower() == b"x-forwarded-for"
        for e in value.decode("latin-1").split(",")
        if e.strip()
    ]
    if peer is not None:
        chain.append(peer)
    if not chain:
        return None
    return chain[max(0, len(chain) - 1 - trusted_hops)]


_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VALUE = r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+|\"(?:[^\"\\]|\\.)*\")"
_PAIR = rf"[!#$%&'*+\-.^_`|~0-9A-Za-z]+={_VALUE}"
_ELEMENT = rf"(?:{_PAIR}(?:\s*;\s*{_PAIR})*)?"
#: RFC 7239 §4: ``Forwarded = 1#forwarded-element``.
_FORWARDED = re.compile(rf"\s*{_ELEMENT}(?:\s*,\s*{_ELEMENT})*\s*")


def _quoted(value: str) -> str:
    if _TOKEN.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _node(address: str | None) -> str:
    """RFC 7239 §6 node: an IPv6 address in brackets and quotes, ``unknown`` if not known."""
    if address is None:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return _quoted(address)
    return f'"[{ip}]"' if ip.version == 6 else str(ip)


def forwarded_element(downstream: Downstream) -> str:
    """The gateway's RFC 7239 element: ``for=<peer>;host=<host>;proto=<scheme>``."""
    parts = [f"for={_node(downstream.peer)}"]
    if downstream.host is not None:
        parts.append(f"host={_quoted(downstream.host)}")
    parts.append(f"proto={downstream.scheme}")
    return ";".join(parts)


# --- limits and framing ---------------------------------------------------------------------------


def check_request(
    raw_path: bytes,
    query_string: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    *,
    http_version: str = "1.1",
    limits: EdgeLimits = DEFAULT_LIMITS,
) -> Refusal | None:
    """A refusal for a request the gateway must not forward, or None. Checked in the order a
    server reads: the URL (414), the header block (431), the framing (400), the declared body
    size (413). A chunked body's size is known only while reading it: :func:`body_refusal`."""
    url_length = len(raw_path) + (len(query_string) + 1 if query_string else 0)
    if limits.max_url_length is not None and url_length > limits.max_url_length:
        return Refusal(
            414, f"the URL is {url_length} bytes long, at most {limits.max_url_length} are allowed"
        )
    if limits.max_header_count is not None and len(headers) > limits.max_header_count:
        return Refusal(
            431, f"{len(headers)} header fields, at most {limits.max_header_count} are allowed"
        )
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    if limits.max_header_bytes is not None and size > limits.max_header_bytes:
        return Refusal(
            431,
            f"the header fields take {size} bytes, at most {limits.max_header_bytes} are allowed",
        )
    framing = _framing(headers, http_version)
    if isinstance(framing, Refusal):
        return framing
    if framing is not None and limits.max_body_bytes is not None:
        return body_refusal(framing, limits)
    return None


def body_refusal(received: int, limits: EdgeLimits = DEFAULT_LIMITS) -> Refusal | None:
    """413 once a body (declared, or counted while streaming) passes the body limit."""
    if limits.max_body_bytes is not None and received > limits.max_body_bytes:
        return Refusal(
            413, f"the body is over {limits.max_body_bytes} bytes (at least {received} bytes)"
        )
    return None


def _framing(headers: Sequence[tuple[bytes, bytes]], http_version: str) -> int | Refusal | None:
    """The declared Content-Length (None if there is none), or a refusal for ambiguous framing:
    the message boundary is what request smuggling attacks make two servers disagree on
    (RFC 9112 §6.1 and §6.3)."""
    lengths: list[bytes] = []
    codings: list[str] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            lengths.extend(v.strip() for v in value.split(b","))
        elif lowered == b"transfer-encoding":
            codings.extend(c.strip().lower() for c in value.decode("latin-1").split(","))
    if codings:
        if http_version == "1.0":
            return Refusal(400, "Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            return Refusal(400, "both Content-Length and Transfer-Encoding: ambiguous framing")
        if codings != ["chunked"]:
            return Refusal(400, "Transfer-Encoding other than a single 'chunked' is not accepted")
        return None
    if not lengths:
        return None
    if any(not v.isdigit() or len(v) > 19 for v in lengths):
        return Refusal(400, "Content-Length is not a non-negative decimal number")
    values = {int(v) for v in lengths}
    if len(values) > 1:
        return Refusal(400, "several different Content-Length values: ambiguous framing")
    return values.pop()


def head_refusal(buffered: bytes) -> Refusal | None:
    """A refusal for the raw bytes of a request head (from its first byte; a head not yet
    complete is checked as far as it goes), or None: line endings other than CRLF and obsolete
    line folding (RFC 9112 §2.2, §5.2). h11 reads a bare LF as a line end and unfolds a folded
    line; a proxy in front of the gateway may do neither, and two parsers that disagree on where
    a header or the head ends are what request smuggling needs. nginx and Envoy refuse both.
    Only the head is read: the body after its blank line is not."""
    end = buffered.find(b"\r\n\r\n")
    head = buffered if end < 0 else buffered[: end + 4]
    if head.endswith(b"\r"):
        head = head[:-1]  # its LF may be in the next read
    crlf = head.count(b"\r\n")
    if head.count(b"\n") != crlf or head.count(b"\r") != crlf:
        return Refusal(400, "a line of the request head does not end with CRLF")
    if b"\n " in head or b"\n\t" in head:
        return Refusal(400, "obsolete line folding in the request head")
    return None
