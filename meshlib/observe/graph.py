"""``meshctl graph``: the who-calls-whom graph of a mesh, from its services' own metrics.

Every meshed process counts its calls in ``mesh_requests_total``: outbound with the caller as
``source`` and the backend as ``destination``, inbound with the caller's verified identity
(or ``unauthenticated``) as ``source``. Scraping several services' ``/metrics`` and summing the
outbound series per (source, destination) gives the edges, as a Kiali-style view would, with no
collector in between. Inbound series complete the picture: they confirm an edge the caller
reported (``seen by: both``) and add the edges whose caller was not scraped (a client outside
the mesh, a service not listed), which only the callee saw.

Callees name a caller by its SPIFFE ID (``account.namespace``), callers name themselves by their
service (``reviews-v1.default``); the two differ when several workloads share one service
account. Each scrape's ``mesh_cert_expiry_timestamp_seconds{identity}`` says which identity that
process presents, so an inbound series from that identity is matched to the scraped callers
that present it instead of becoming a node of its own.

An ingress gateway (:mod:`meshlib.gateway`) says so in its metrics:
``mesh_gateway_info{service, gateway}`` is 1 in the process serving that Gateway as that Service.
Requests its inbound side counted from ``unauthenticated`` callers are then drawn from
:data:`OUTSIDE`, the clients outside the mesh, and the gateway is marked as the entry node
(text: an ``entry:`` line and ``[ingress]`` beside its name; SVG: its own colour and an
"ingress gateway" caption, the outside as a dashed node): outside → gateway → services.

Two scrapes ``interval`` seconds apart give rates (requests per second over the interval);
one scrape gives totals since each process started. Counters that went backwards (a restart)
count from zero.

Rendering is plain text (for a terminal), a hand-written SVG (nodes in layers from the entry
points, edges labelled with requests and success rate) or an HTML page embedding the SVG.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

#: A scrape: one series key -> its value. The key is (direction, source, destination, code);
#: direction ``identity`` marks the SPIFFE ID the scraped process presents (value 1).
Series = dict[tuple[str, str, str, str], float]

IDENTITY = "identity"
#: Direction of the series marking an ingress gateway: (GATEWAY, its service, the Gateway, "").
GATEWAY = "gateway"
#: The node standing for clients outside the mesh, when they come in through a gateway.
OUTSIDE = "outside"

_SPIFFE = re.compile(r"^spiffe://[^/]+/ns/(?P<ns>[^/]+)/sa/(?P<sa>[^/]+)$")
UNAUTHENTICATED = "unauthenticated"


class GraphError(Exception):
    """A scrape that failed or did not parse; the message names the URL."""


@dataclass(frozen=True, slots=True)
class Edge:
    """Calls from ``source`` to ``destination`` over the observed window."""

    source: str
    destination: str
    requests: float
    successes: float
    seen_by: str  # "caller", "callee" or "both"
    rate: float | None = None  # requests per second, when two scrapes were taken

    @property
    def success_rate(self) -> float | None:
        """Share of calls not answered 5xx nor failed (``None`` without calls)."""
        return self.successes / self.requests if self.requests else None


@dataclass(frozen=True, slots=True)
class Graph:
    nodes: tuple[str, ...]
    edges: tuple[Edge, ...]
    interval: float | None  # seconds between the two scrapes, None for totals
    sources: int  # how many endpoints were scraped
    #: The ingress gateways among the nodes: (node, Gateway ``namespace/name``), sorted.
    ingress: tuple[tuple[str, str], ...] = ()

    @property
    def entries(self) -> frozenset[str]:
        """The nodes that are ingress gateways."""
        return frozenset(node for node, _ in self.ingress)


def parse(text: str, url: str = "<text>") -> Series:
    """The ``mesh_requests_total`` series of one exposition, summed over route and reason,
    and the identity the process presents (from ``mesh_cert_expiry_timestamp_seconds``)."""
    from prometheus_client.parser import text_string_to_metric_families

    series: Series = defaultdict(float)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "mesh_cert_expiry_timestamp_seconds" and labels.get(IDENTITY):
                    series[(IDENTITY, labels[IDENTITY], "", "")] = 1.0
                    continue
                if sample.name == "mesh_gateway_info" and labels.get("service"):
                    if sample.value:
                        series[(GATEWAY, labels["service"], labels.get("gateway", ""), "")] = 1.0
                    continue
                if sample.name != "mesh_requests_total":
                    continue
                key = (
                    labels.get("direction", ""),
                    labels.get("source", ""),
                    labels.get("destination", ""),
                    labels.get("code", ""),
                )
                series[key] += sample.value
    except ValueError as exc:
        raise GraphError(f"{url}: not a Prometheus exposition ({exc})") from exc
    return dict(series)


def delta(before: Series, after: Series) -> Series:
    """What each series counted between two scrapes (a counter that went down restarted)."""
    out: Series = {}
    for key, value in after.items():
        previous = before.get(key, 0.0)
        out[key] = value - previous if value >= previous else value
    return out


def service_name(source: str) -> str:
    """A node name for a ``source`` label: SPIFFE IDs become ``account.namespace`` (the
    form of the outbound side's service keys); anything else is kept."""
    match = _SPIFFE.match(source)
    return f"{match['sa']}.{match['ns']}" if match else source


def _succeeded(code: str) -> bool:
    return code.isdigit() and int(code) < 500


def build(scrapes: Sequence[Series], interval: float | None = None) -> Graph:
    """The graph of the summed scrapes (each one process: replicas add up)."""
    outbound: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    inbound: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    # an identity's node name -> the scraped workloads presenting it
    presented_by: dict[str, set[str]] = defaultdict(set)
    gateways: dict[str, str] = {}  # an ingress gateway's node -> its Gateway
    for series in scrapes:
        own = {source for direction, source, _, _ in series if direction == "outbound"}
        for direction, source, destination, _ in series:
            if direction == IDENTITY:
                presented_by[service_name(source)] |= own
            elif direction == GATEWAY:
                gateways[source] = destination
        for (direction, source, destination, code), value in series.items():
            if direction == "outbound":
                table = outbound
            elif direction == "inbound":
                table, source = inbound, service_name(source)
                if source == UNAUTHENTICATED and destination in gateways:
                    source = OUTSIDE  # no mesh identity, through the gateway: from outside
            else:
                continue
            counts = table[(source, destination)]
            counts[0] += value
            if _succeeded(code):
                counts[1] += value
    reporters = {source for source, _ in outbound}
    called = {destination for _, destination in outbound}
    reporting_callees = {destination for _, destination in inbound}
    callers_of: dict[str, set[str]] = defaultdict(set)
    for source, destination in outbound:
        callers_of[destination].add(source)
    edges = [
        _edge(s, d, counts, "both" if d in reporting_callees else "caller", interval)
        for (s, d), counts in outbound.items()
    ]
    for (s, d), counts in inbound.items():
        if s in reporters or presented_by.get(s, set()) & callers_of[d]:
            continue  # the caller reported it (under its own name, or one presenting s)
        if s == UNAUTHENTICATED and d in called:
            continue  # plain-HTTP callers are all "unauthenticated"
        edges.append(_edge(s, d, counts, "callee", interval))
    edges = [e for e in edges if e.requests > 0 or interval is None]
    edges.sort(key=lambda e: (e.source, e.destination))
    nodes = sorted({e.source for e in edges} | {e.destination for e in edges})
    ingress = tuple(sorted((node, name) for node, name in gateways.items() if node in nodes))
    return Graph(tuple(nodes), tuple(edges), interval, len(scrapes), ingress)


def _edge(
    source: str, destination: str, counts: list[float], seen_by: str, interval: float | None
) -> Edge:
    rate = counts[0] / interval if interval else None
    return Edge(source, destination, counts[0], counts[1], seen_by, rate)


def scrape(urls: Iterable[str], timeout: float = 5.0) -> list[Series]:
    """Fetch and parse each URL: a metrics URL, or a base URL (``http://host:port``,
    ``host:port``) meaning its ``/metrics``. Redirects are followed, so an app whose router
    answers ``/metrics`` with a redirect to ``/metrics/`` (a Starlette ``Mount``) is read."""
    import httpx

    out: list[Series] = []
    with httpx.Client(timeout=timeout, follow_redirects=True) as client:
        targets = dict.fromkeys(metrics_url(url) for url in urls)  # each endpoint counted once
        for target in targets:
            try:
                response = client.get(target)
            except httpx.HTTPError as exc:
                raise GraphError(f"{target}: {failure(exc, timeout)}") from exc
            if response.status_code != 200:
                raise GraphError(f"{response.url}: HTTP {response.status_code}")
            out.append(parse(response.text, target))
    return out


def metrics_url(url: str) -> str:
    """``url`` with ``http://`` when it has no scheme and ``/metrics`` when it has no path."""
    import httpx

    text = url if "://" in url else f"http://{url}"
    try:
        parsed = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise GraphError(f"{url}: not a URL ({exc})") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise GraphError(f"{url}: not an http(s) URL")
    return str(parsed.copy_with(path="/metrics")) if parsed.path in ("", "/") else text


def failure(exc: Exception, timeout: float | None = None) -> str:
    """Why an HTTP request failed, in a few words (no traceback, no documentation link):
    ``connection refused``, ``no answer within 5s``, ``name not resolved``..."""
    import httpx

    detail = str(exc).strip()
    errno = re.match(r"^\[Errno -?\d+\] (.*)$", detail)
    if errno:
        detail = errno[1]
    within = f" within {timeout:g}s" if timeout else ""
    if isinstance(exc, httpx.ConnectTimeout):
        return f"could not connect{within} (timed out)"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer{within}"
    if isinstance(exc, httpx.ConnectError):
        lowered = detail.lower()
        if "refused" in lowered:
            return "connection refused (nothing listening there?)"
        if "name or service not known" in lowered or "nodename nor servname" in lowered:
            return "name not resolved"
        return f"could not connect: {detail or type(exc).__name__}"
    if isinstance(exc, httpx.TooManyRedirects):
        return "too many redirects"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"not an HTTP answer ({detail or 'the server closed the connection'})"
    return detail.splitlines()[0] if detail else type(exc).__name__


def as_dict(graph: Graph) -> dict[str, object]:
    """The graph as data (``meshctl graph -o json|yaml``; the shape is in docs/cli.md)."""
    return {
        "window_seconds": graph.interval,
        "scraped": graph.sources,
        "nodes": list(graph.nodes),
        "ingress": [{"node": node, "gateway": name} for node, name in graph.ingress],
        "edges": [
            {
                "source": e.source,
                "destination": e.destination,
                "requests": e.requests,
                "successes": e.successes,
                "success_rate": None if e.success_rate is None else round(e.success_rate, 6),
                "rate": None if e.rate is None else round(e.rate, 6),
                "seen_by": e.seen_by,
            }
            for e in graph.edges
        ],
    }


# --- rendering -----------------------------------------------------------------------------------


def _success(edge: Edge) -> str:
    rate = edge.success_rate
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _count(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def render_text(graph: Graph) -> str:
    """One line per edge: requests (and rate), success rate and who reported it."""
    window = f"over {graph.interval:g}s" if graph.interval else "totals since start"
    head = f"service graph: {len(graph.nodes)} services, {len(graph.edges)} edges ({window}, "
    head += f"{graph.sources} scraped)"
    entries = graph.entries

    def name(node: str) -> str:
        return f"{node} [ingress]" if node in entries else node

    rows = [("edge", "requests", "rps", "success", "seen by")]
    for e in graph.edges:
        rps = "-" if e.rate is None else f"{e.rate:.2f}"
        rows.append(
            (
                f"{name(e.source)} → {name(e.destination)}",
                _count(e.requests),
                rps,
                _success(e),
                e.seen_by,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [head]
    for node, gateway in graph.ingress:
        lines.append(f"entry: {node} (ingress gateway {gateway}): {OUTSIDE} → {node} → services")
    lines.append("")
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:4], widths[1:4], strict=True)
        ]
        lines.append("  ".join([*cells, row[4]]).rstrip())
    if not graph.edges:
        lines.append("(no mesh_requests_total series found)")
    return "\n".join(lines) + "\n"


def _layers(graph: Graph) -> dict[str, int]:
    """Each node's column: its longest distance from an entry point (a node nobody calls),
    cycles cut; nodes only on cycles start at column 0."""
    callers: Mapping[str, list[str]] = _adjacent(graph, reverse=True)
    callees = _adjacent(graph)
    layer = {n: 0 for n in graph.nodes}
    frontier = [n for n in graph.nodes if not callers.get(n)] or list(graph.nodes[:1])
    seen: set[str] = set(frontier)
    while frontier:
        following: list[str] = []
        for node in frontier:
            for nxt in callees.get(node, ()):
                if nxt not in seen:
                    seen.add(nxt)
                    layer[nxt] = layer[node] + 1
                    following.append(nxt)
        frontier = following
        if not frontier:
            rest = [n for n in graph.nodes if n not in seen]
            frontier = rest[:1]
            seen.update(frontier)
    return layer


def _adjacent(graph: Graph, reverse: bool = False) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for e in graph.edges:
        a, b = (e.destination, e.source) if reverse else (e.source, e.destination)
        out[a].append(b)
    return out


_COL, _ROW, _RADIUS = 260, 120, 34
_PAD = 16  # blank border around the drawing
_FONT = 12  # px; text widths are estimated from it (no font metrics without a renderer)
_CHAR = 0.62  # average glyph advance of a sans-serif face, in em
_LABEL_H = 16  # height of an edge label's background
_GAP = 4  # between a line and its label's background


def _text_width(text: str, size: float = _FONT) -> float:
    return len(text) * size * _CHAR


def _positions(graph: Graph) -> dict[str, tuple[float, float]]:
    """Node centres: one column per layer, each column centred on the tallest one."""
    columns: dict[int, list[str]] = defaultdict(list)
    for node, column in sorted(_layers(graph).items(), key=lambda kv: (kv[1], kv[0])):
        columns[column].append(node)
    tallest = max((len(c) for c in columns.values()), default=1)
    pos: dict[str, tuple[float, float]] = {}
    for column, nodes in columns.items():
        offset = (tallest - len(nodes)) * _ROW / 2
        for row, node in enumerate(nodes):
            pos[node] = (column * _COL, offset + row * _ROW)
    return pos


#: Success-rate bands: (lowest rate, colour, legend text), best first.
_BANDS = (
    (0.99, "#2e7d32", "≥ 99% success"),
    (0.95, "#ef6c00", "95–99% success"),
    (0.0, "#c62828", "< 95% success"),
)


def _color(edge: Edge) -> str:
    rate = edge.success_rate
    if rate is None:
        return _BANDS[0][1]
    return next(color for low, color, _ in _BANDS if rate >= low)


class _Box:
    """The bounding box of what has been drawn, so the canvas fits the content."""

    def __init__(self) -> None:
        self.x0 = self.y0 = math.inf
        self.x1 = self.y1 = -math.inf

    def add(self, x0: float, y0: float, x1: float, y1: float) -> None:
        self.x0, self.y0 = min(self.x0, x0), min(self.y0, y0)
        self.x1, self.y1 = max(self.x1, x1), max(self.y1, y1)

    def text(self, x: float, y: float, text: str, anchor: str, size: float = _FONT) -> None:
        """A text at baseline ``y``: its box, from ``x`` by ``anchor``."""
        width = _text_width(text, size)
        left = {"start": x, "middle": x - width / 2, "end": x - width}[anchor]
        self.add(left, y - size, left + width, y + size * 0.3)


def window_text(graph: Graph) -> str:
    """What the numbers cover: a rate window or totals since start."""
    if graph.interval:
        return f"rates over {graph.interval:g}s (two scrapes {graph.interval:g}s apart)"
    return "totals since each process started"


def render_svg(graph: Graph) -> str:
    """A standalone SVG: a title and the window the numbers cover; services as circles in
    columns from the entry points; calls as arrows coloured by success rate, each labelled
    (requests or requests per second, and success rate) beside its line on a background;
    a legend for the colours and labels. The canvas is the drawing's bounding box."""
    pos = _positions(graph)
    box = _Box()
    body: list[str] = []
    reciprocal = {(e.source, e.destination) for e in graph.edges}
    for edge in graph.edges:
        two_way = (edge.destination, edge.source) in reciprocal
        body.append(_svg_edge(edge, pos, box, two_way))
    entries = graph.entries
    for node, (x, y) in sorted(pos.items()):
        box.add(x - _RADIUS, y - _RADIUS, x + _RADIUS, y + _RADIUS)
        box.text(x, y + _RADIUS + 16, node, "middle")
        kind, fill, stroke, extra, caption = "node", "#e3f2fd", "#1565c0", "", ""
        if node in entries:
            kind, fill, stroke, caption = "node ingress", "#fff3e0", "#e65100", "ingress gateway"
        elif node == OUTSIDE and entries:
            kind, fill, stroke, caption = "node outside", "#f5f5f5", "#616161", "clients"
            extra = ' stroke-dasharray="6 4"'
        label = (
            f'<text x="{x:.1f}" y="{y + _RADIUS + 16:.1f}" text-anchor="middle">'
            f"{escape(node)}</text>"
        )
        if caption:
            box.text(x, y + _RADIUS + 31, caption, "middle", 10)
            label += (
                f'<text class="caption" x="{x:.1f}" y="{y + _RADIUS + 31:.1f}" '
                f'text-anchor="middle" font-size="10" fill="{stroke}">{caption}</text>'
            )
        body.append(
            f'<g class="{kind}"><circle cx="{x:.1f}" cy="{y:.1f}" r="{_RADIUS}" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="2"{extra}/>{label}</g>'
        )
    if not pos:
        box.add(0, 0, 0, 0)
    # the title above the drawing, the legend below it, both from its left edge
    left, top = box.x0, box.y0
    title = "meshlib service graph"
    subtitle = (
        f"{len(graph.nodes)} services, {len(graph.edges)} edges, {graph.sources} scraped · "
        f"{window_text(graph)}"
    )
    head = [
        f'<text class="title" x="{left:.1f}" y="{top - 30:.1f}" font-size="16" '
        f'font-weight="bold">{escape(title)}</text>',
        f'<text class="window" x="{left:.1f}" y="{top - 12:.1f}" fill="#555">'
        f"{escape(subtitle)}</text>",
    ]
    box.text(left, top - 30, title, "start", 16)
    box.text(left, top - 12, subtitle, "start")
    body = head + body + [_legend(graph, left, box.y1 + 24, box)]
    x0, y0 = box.x0 - _PAD, box.y0 - _PAD
    width, height = box.x1 - box.x0 + 2 * _PAD, box.y1 - box.y0 + 2 * _PAD
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="{x0:.1f} {y0:.1f} {width:.1f} {height:.1f}" font-family="sans-serif" '
        f'font-size="{_FONT}">',
        f"<title>{escape(title)}: {escape(subtitle)}</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
        'markerHeight="8" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="context-stroke"/></marker></defs>',
        f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{width:.1f}" height="{height:.1f}" fill="white"/>',
        *body,
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def _legend(graph: Graph, x: float, y: float, box: _Box) -> str:
    """The colours' meaning in one row, then what a label says, from (``x``, ``y``)."""
    items = []
    cx = x
    for _, color, text in _BANDS:
        items.append(
            f'<line x1="{cx:.1f}" y1="{y - 4:.1f}" x2="{cx + 24:.1f}" y2="{y - 4:.1f}" '
            f'stroke="{color}" stroke-width="3"/>'
            f'<text x="{cx + 30:.1f}" y="{y:.1f}">{escape(text)}</text>'
        )
        box.text(cx + 30, y, text, "start")
        cx += 30 + _text_width(text) + 20
    amount = "requests per second" if graph.interval else "requests"
    note = f"edge label: {amount} · success rate (not 5xx, not failed); hover an edge for details"
    items.append(f'<text x="{x:.1f}" y="{y + 20:.1f}" fill="#555">{escape(note)}</text>')
    box.text(x, y + 20, note, "start")
    return f'<g class="legend">{"".join(items)}</g>'


def _label(x: float, y: float, text: str, color: str, box: _Box) -> str:
    """``text`` centred on (``x``, ``y``) over a white rounded background."""
    width = _text_width(text) + 8
    box.add(x - width / 2, y - _LABEL_H / 2, x + width / 2, y + _LABEL_H / 2)
    return (
        f'<g class="label"><rect x="{x - width / 2:.1f}" y="{y - _LABEL_H / 2:.1f}" '
        f'width="{width:.1f}" height="{_LABEL_H}" rx="3" fill="white" fill-opacity="0.9" '
        f'stroke="{color}" stroke-width="0.5"/><text x="{x:.1f}" y="{y + _FONT * 0.35:.1f}" '
        f'text-anchor="middle" fill="{color}">{escape(text)}</text></g>'
    )


def _svg_edge(edge: Edge, pos: Mapping[str, tuple[float, float]], box: _Box, two_way: bool) -> str:
    (x1, y1), (x2, y2) = pos[edge.source], pos[edge.destination]
    color = _color(edge)
    amount = f"{edge.rate:.2f} req/s" if edge.rate is not None else f"{_count(edge.requests)} req"
    label = f"{amount} · {_success(edge)}"
    title = escape(
        f"{edge.source} → {edge.destination}: {amount}, {_success(edge)} success, "
        f"seen by {edge.seen_by}"
    )
    if (x1, y1) == (x2, y2):  # a service calling itself: a loop above the node
        top = y1 - _RADIUS
        box.add(x1 - 40, top - 60, x1 + 40, top)
        return (
            f'<g class="edge"><title>{title}</title><path d="M{x1 - 12:.1f},{top:.1f} '
            f'C{x1 - 40:.1f},{top - 60:.1f} {x1 + 40:.1f},{top - 60:.1f} {x1 + 12:.1f},{top:.1f}" '
            f'fill="none" stroke="{color}" stroke-width="2" marker-end="url(#arrow)"/>'
            f"{_label(x1, top - 55 - _LABEL_H / 2, label, color, box)}</g>"
        )
    length = math.hypot(x2 - x1, y2 - y1)
    ux, uy = (x2 - x1) / length, (y2 - y1) / length
    # A call each way keeps each label on the left of its own direction of travel; a one-way
    # edge's label goes on the outer side of a fan (below a line going down, above one going
    # up or level, right of a vertical one), away from its siblings' labels.
    nx, ny = uy, -ux
    if not two_way:
        outward = ny * uy > 0 if uy else ny < 0
        if not outward and not (ny == 0 and nx > 0):
            nx, ny = -nx, -ny
    shift = 5.0 if two_way else 0.0  # a call each way: two lines side by side, not one
    sx, sy = x1 + ux * _RADIUS + nx * shift, y1 + uy * _RADIUS + ny * shift
    ex, ey = x2 - ux * (_RADIUS + 2) + nx * shift, y2 - uy * (_RADIUS + 2) + ny * shift
    # the label's centre: far enough along the normal that its box clears the line
    width = _text_width(label) + 8
    clear = abs(nx) * width / 2 + abs(ny) * _LABEL_H / 2 + _GAP
    lx, ly = (sx + ex) / 2 + nx * clear, (sy + ey) / 2 + ny * clear
    box.add(min(sx, ex), min(sy, ey), max(sx, ex), max(sy, ey))
    return (
        f'<g class="edge"><title>{title}</title><line x1="{sx:.1f}" y1="{sy:.1f}" '
        f'x2="{ex:.1f}" y2="{ey:.1f}" stroke="{color}" stroke-width="2" '
        f'marker-end="url(#arrow)"/>{_label(lx, ly, label, color, box)}</g>'
    )


def render_html(graph: Graph) -> str:
    """A self-contained page: the SVG and the text table, no external resources."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>meshlib service graph</title>"
        "<style>body{font-family:sans-serif;margin:2em}pre{background:#f5f5f5;padding:1em}"
        "</style></head><body>\n<h1>meshlib service graph</h1>\n"
        f"{render_svg(graph)}<pre>{escape(render_text(graph))}</pre>\n</body></html>\n"
    )


RENDERERS = {"text": render_text, "svg": render_svg, "html": render_html}
