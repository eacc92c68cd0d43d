"""``meshctl graph`` on a live three-service chain (a → b → c over real sockets), each service
serving its own metrics through ``meshlib.metrics_app``; then the graph logic alone."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import ServerHandle, run_uvicorn
from prometheus_client import CollectorRegistry

import meshlib
from meshlib import cli
from meshlib.observe import graph

pytestmark = pytest.mark.timeout(60)

SVG = "{http://www.w3.org/2000/svg}"


def _service(name: str, port: int) -> str:
    return (
        "apiVersion: meshlib/v1\nkind: Service\n"
        f"metadata: {{name: {name}}}\nspec:\n  endpoints: [{{address: '127.0.0.1:{port}'}}]\n"
    )


def _app(mesh: meshlib.Mesh, registry: CollectorRegistry, next_hop: str | None) -> Any:
    """``/metrics`` outside the mesh (a scrape is not traffic); everything else through the
    middleware: forward the same path to ``next_hop``, or, at the end of the chain, answer 503
    for ``/fail`` and 200 otherwise."""
    metrics = meshlib.metrics_app(registry)

    async def handler(scope: Any, receive: Any, send: Any) -> None:
        status = 503 if scope["path"] == "/fail" else 200
        if next_hop is not None:
            async with mesh.async_client() as client:
                status = (await client.get(f"http://{next_hop}{scope['path']}")).status_code
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    meshed = meshlib.MeshMiddleware(handler, mesh=mesh)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await metrics(scope, receive, send)
        else:
            await meshed(scope, receive, send)

    return app


@pytest.fixture
def chain() -> Iterator[dict[str, ServerHandle]]:
    """Services c, b, a started in that order (each needs the next one's port)."""
    servers: dict[str, ServerHandle] = {}
    meshes: list[meshlib.Mesh] = []
    try:
        next_hop: tuple[str, int] | None = None
        for name in ("c", "b", "a"):
            policy = _service(*next_hop) if next_hop else _service("nobody", 9)
            registry = CollectorRegistry()
            mesh = meshlib.Mesh.from_text(policy, service=name, registry=registry, watch=False)
            meshes.append(mesh)
            hop = next_hop[0] if next_hop else None
            servers[name] = run_uvicorn(_app(mesh, registry, hop), name=f"graph-{name}")
            next_hop = (name, servers[name].port)
        yield servers
    finally:
        for server in servers.values():
            server.stop()
        for mesh in meshes:
            mesh.close()


def _drive(chain: dict[str, ServerHandle], ok: int, fail: int) -> None:
    with httpx.Client(base_url=chain["a"].url) as client:
        for path in ["/ok"] * ok + ["/fail"] * fail:
            client.get(path)


def test_graph_text_lists_the_exact_edges_and_counts(
    chain: dict[str, ServerHandle], capsys: pytest.CaptureFixture[str]
) -> None:
    _drive(chain, ok=5, fail=2)
    urls = [f"{chain[n].url}/metrics" for n in ("a", "b", "c")]
    assert cli.main(["graph", *urls]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "service graph: 4 services, 3 edges (totals since start, 3 scraped)"
    rows = [line.split() for line in out[3:]]
    assert rows == [
        ["a.default", "→", "b.default", "7", "-", "71.4%", "both"],
        ["b.default", "→", "c.default", "7", "-", "71.4%", "both"],
        ["unauthenticated", "→", "a.default", "7", "-", "71.4%", "callee"],
    ]


def test_graph_svg_and_html_files(chain: dict[str, ServerHandle], tmp_path: Path) -> None:
    _drive(chain, ok=3, fail=0)
    urls = [chain[n].url for n in ("a", "b", "c")]  # no path: /metrics is implied
    svg_file, html_file = tmp_path / "graph.svg", tmp_path / "graph.html"
    assert cli.main(["graph", *urls, "--format", "svg", "--out", str(svg_file)]) == 0
    root = ET.fromstring(svg_file.read_text())
    assert root.tag == f"{SVG}svg"
    names = {t.text for g in root.iter(f"{SVG}g") if g.get("class") == "node" for t in g}
    assert names >= {"a.default", "b.default", "c.default", "unauthenticated"}
    titles = [t.text for g in root.iter(f"{SVG}g") if g.get("class") == "edge" for t in g]
    assert "a.default → b.default: 3 req, 100.0% success, seen by both" in titles
    assert cli.main(["graph", *urls, "--format", "html", "--out", str(html_file)]) == 0
    page = html_file.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "b.default" in page


def test_graph_rates_from_two_scrapes(
    chain: dict[str, ServerHandle], capsys: pytest.CaptureFixture[str]
) -> None:
    _drive(chain, ok=4, fail=0)  # before the window: not counted
    urls = [chain[n].url for n in ("a", "b")]
    before = graph.scrape(urls)
    _drive(chain, ok=2, fail=0)
    after = graph.scrape(urls)
    g = graph.build([graph.delta(x, y) for x, y in zip(before, after, strict=True)], 2.0)
    edges = {(e.source, e.destination): e for e in g.edges}
    assert edges[("a.default", "b.default")].requests == 2
    assert edges[("a.default", "b.default")].rate == 1.0
    assert edges[("b.default", "c.default")].seen_by == "caller"  # c was not scraped


def test_graph_names_the_url_it_could_not_scrape(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["graph", "http://127.0.0.1:9/metrics", "--timeout", "2"]) == 1
    assert capsys.readouterr().err.startswith("meshctl graph: http://127.0.0.1:9/metrics: ")
    assert cli.main(["graph", "ftp://x"]) == 1
    assert capsys.readouterr().err == "meshctl graph: ftp://x: not an http(s) URL\n"


def test_graph_names_the_file_it_could_not_write(
    chain: dict[str, ServerHandle], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "missing" / "graph.svg"
    assert cli.main(["graph", chain["a"].url, "--out", str(out)]) == 1
    assert capsys.readouterr().err.startswith(f"meshctl graph: cannot write {out}: ")


# --- the graph logic alone ---------------------------------------------------------------------


def _exposition(*rows: tuple[str, str, str, str, float]) -> str:
    lines = ["# TYPE mesh_requests counter"]
    for direction, source, destination, code, value in rows:
        lines.append(
            f'mesh_requests_total{{direction="{direction}",source="{source}",'
            f'destination="{destination}",route="",code="{code}",reason="ok"}} {value}'
        )
    return "\n".join(lines) + "\n"


def test_inbound_from_an_unscraped_identity_completes_the_graph() -> None:
    spiffe = "spiffe://shop.test/ns/prod/sa/batch"
    callee = graph.parse(
        _exposition(
            ("inbound", spiffe, "api.prod", "200", 9),
            ("inbound", spiffe, "api.prod", "500", 1),
            ("inbound", "spiffe://shop.test/ns/prod/sa/web", "api.prod", "200", 4),
        )
    )
    caller = graph.parse(_exposition(("outbound", "web.prod", "api.prod", "200", 4)))
    g = graph.build([callee, caller])
    assert [(e.source, e.destination, e.requests, e.seen_by) for e in g.edges] == [
        ("batch.prod", "api.prod", 10, "callee"),
        ("web.prod", "api.prod", 4, "both"),
    ]
    assert g.edges[0].success_rate == 0.9


def test_workloads_sharing_a_service_account_are_matched_by_the_identity_they_present() -> None:
    """reviews-v1 and reviews-v2 both present .../sa/reviews: the callee's inbound series from
    that identity confirms their edges instead of adding a ``reviews.default`` node."""
    spiffe = "spiffe://cluster.local/ns/default/sa/reviews"
    expiry = f'mesh_cert_expiry_timestamp_seconds{{identity="{spiffe}"}} 1.9e9\n'
    v1 = graph.parse(_exposition(("outbound", "reviews-v1.default", "ratings.default", "200", 6)))
    v1_with_id = graph.parse(
        _exposition(("outbound", "reviews-v1.default", "ratings.default", "200", 6)) + expiry
    )
    v2 = graph.parse(
        _exposition(("outbound", "reviews-v2.default", "ratings.default", "200", 4)) + expiry
    )
    ratings = graph.parse(_exposition(("inbound", spiffe, "ratings.default", "200", 10)))

    g = graph.build([v1_with_id, v2, ratings])
    assert [(e.source, e.destination, e.requests, e.seen_by) for e in g.edges] == [
        ("reviews-v1.default", "ratings.default", 6, "both"),
        ("reviews-v2.default", "ratings.default", 4, "both"),
    ]
    assert g.nodes == ("ratings.default", "reviews-v1.default", "reviews-v2.default")
    # the identity marker survives a delta of two scrapes
    assert graph.build([graph.delta(v2, v2), ratings]).edges[-1].seen_by == "both"
    # without the marker (an old exposition) the callee's view stays a node of its own
    old = graph.build([v1, ratings])
    assert ("reviews.default", "ratings.default", 10, "callee") in [
        (e.source, e.destination, e.requests, e.seen_by) for e in old.edges
    ]


def test_an_ingress_gateway_is_the_entry_node_and_its_callers_are_outside() -> None:
    info = 'mesh_gateway_info{service="gateway.edge",gateway="edge/public"} 1.0\n'
    gateway = graph.parse(
        _exposition(
            ("inbound", "unauthenticated", "gateway.edge", "200", 9),
            ("inbound", "unauthenticated", "gateway.edge", "404", 1),
            ("outbound", "gateway.edge", "productpage.default", "200", 9),
        )
        + info
    )
    productpage = graph.parse(
        _exposition(
            (
                "inbound",
                "spiffe://cluster.local/ns/edge/sa/gateway",
                "productpage.default",
                "200",
                9,
            ),
        )
    )
    g = graph.build([gateway, productpage])
    assert [(e.source, e.destination, e.requests, e.seen_by) for e in g.edges] == [
        ("gateway.edge", "productpage.default", 9, "both"),
        ("outside", "gateway.edge", 10, "callee"),
    ]
    assert g.ingress == (("gateway.edge", "edge/public"),)
    text = graph.render_text(g).splitlines()
    assert (
        text[1]
        == "entry: gateway.edge (ingress gateway edge/public): outside → gateway.edge → services"
    )
    assert [line.split()[:3] for line in text[4:]] == [
        ["gateway.edge", "[ingress]", "→"],
        ["outside", "→", "gateway.edge"],
    ]
    root = _svg(g)
    kinds = {
        (group.get("class"), group.find(f"{SVG}text").text)  # type: ignore[union-attr]
        for group in root.iter(f"{SVG}g")
        if (group.get("class") or "").startswith("node")
    }
    assert kinds == {
        ("node ingress", "gateway.edge"),
        ("node outside", "outside"),
        ("node", "productpage.default"),
    }
    assert "ingress gateway" in _texts(root)
    # columns from the outside in: outside, then the gateway, then the service
    x = {
        group.find(f"{SVG}text").text: float(group.find(f"{SVG}circle").get("cx"))  # type: ignore[union-attr,arg-type]
        for group in root.iter(f"{SVG}g")
        if (group.get("class") or "").startswith("node")
    }
    assert x["outside"] < x["gateway.edge"] < x["productpage.default"]
    assert graph.as_dict(g)["ingress"] == [{"node": "gateway.edge", "gateway": "edge/public"}]
    # without the marker the same series are an unauthenticated caller of a service
    plain = graph.parse(_exposition(("inbound", "unauthenticated", "gateway.edge", "200", 9)))
    assert [e.source for e in graph.build([plain]).edges] == ["unauthenticated"]
    assert graph.build([plain]).ingress == ()


def test_a_counter_reset_counts_from_zero() -> None:
    key = ("outbound", "a.default", "b.default", "200")
    assert graph.delta({key: 100.0}, {key: 7.0}) == {key: 7.0}
    assert graph.delta({key: 100.0}, {key: 107.0}) == {key: 7.0}


def test_garbage_is_reported_with_its_url() -> None:
    with pytest.raises(graph.GraphError, match=r"^http://x/metrics: not a Prometheus"):
        graph.parse("this is {not metrics\n", "http://x/metrics")


def test_empty_graph_renders() -> None:
    g = graph.build([])
    assert "(no mesh_requests_total series found)" in graph.render_text(g)
    ET.fromstring(graph.render_svg(g))


# --- the SVG's layout (issue 10 item 14) --------------------------------------------------------


def _bookinfo(interval: float | None = None) -> graph.Graph:
    def series(*rows: tuple[str, str, str, str, float]) -> graph.Series:
        return {(d, s, t, c): v for d, s, t, c, v in rows}

    productpage = series(
        ("outbound", "productpage.default", "reviews-v1.default", "200", 480),
        ("outbound", "productpage.default", "reviews-v1.default", "503", 20),
        ("outbound", "productpage.default", "reviews-v2.default", "200", 500),
        ("outbound", "productpage.default", "details.default", "200", 1000),
        ("inbound", "unauthenticated", "productpage.default", "200", 1000),
    )
    reviews = series(
        ("outbound", "reviews-v2.default", "ratings.default", "200", 450),
        ("outbound", "reviews-v2.default", "ratings.default", "500", 50),
        ("outbound", "ratings.default", "reviews-v2.default", "200", 7),
        ("outbound", "details.default", "details.default", "200", 5),
    )
    return graph.build([productpage, reviews], interval)


def _svg(g: graph.Graph) -> ET.Element:
    return ET.fromstring(graph.render_svg(g))


def _texts(element: ET.Element) -> list[str]:
    return [t.text or "" for t in element.iter(f"{SVG}text")]


def test_svg_has_a_title_with_the_window_and_a_legend_for_the_colours() -> None:
    root = _svg(_bookinfo())
    (title,) = [t for t in root.iter(f"{SVG}text") if t.get("class") == "title"]
    assert title.text == "meshlib service graph"
    (window,) = [t for t in root.iter(f"{SVG}text") if t.get("class") == "window"]
    assert window.text == ("6 services, 7 edges, 2 scraped · totals since each process started")
    (legend,) = [g for g in root.iter(f"{SVG}g") if g.get("class") == "legend"]
    texts = _texts(legend)
    assert texts[:3] == ["≥ 99% success", "95–99% success", "< 95% success"]
    assert texts[3].startswith("edge label: requests · success rate")
    colours = [line.get("stroke") for line in legend.iter(f"{SVG}line")]
    edge_colours = {
        line.get("stroke")
        for g in root.iter(f"{SVG}g")
        if g.get("class") == "edge"
        for line in [*g.iter(f"{SVG}line"), *g.iter(f"{SVG}path")]
    }
    assert edge_colours == set(colours)  # green, orange and red all drawn, all explained

    rates = _svg(_bookinfo(interval=10.0))
    (window,) = [t for t in rates.iter(f"{SVG}text") if t.get("class") == "window"]
    assert window.text is not None and window.text.endswith(
        "rates over 10s (two scrapes 10s apart)"
    )
    assert "50.00 req/s · 90.0%" in _texts(rates)


def test_svg_canvas_fits_the_drawing() -> None:
    """No blank third: the viewBox ends a padding past the outermost nodes and texts."""
    root = _svg(_bookinfo())
    x0, y0, width, height = (float(v) for v in (root.get("viewBox") or "").split())
    circles = [
        (float(c.get("cx") or 0), float(c.get("cy") or 0), float(c.get("r") or 0))
        for c in root.iter(f"{SVG}circle")
    ]
    left = min(cx - r for cx, _, r in circles)
    right = max(cx + r for cx, _, r in circles)
    top = min(cy - r for _, cy, r in circles)
    bottom = max(cy + r for _, cy, r in circles)
    assert x0 <= left and right <= x0 + width and y0 <= top and bottom <= y0 + height
    # beyond the circles: half a node name (at most ~80 px) and the padding across; above,
    # the self-loop, its label and the title; below, a node name and the legend's two lines
    assert left - x0 <= 100 and x0 + width - right <= 100
    assert top - y0 <= 180 and y0 + height - bottom <= 110
    assert (root.get("width"), root.get("height")) == (f"{width:.0f}", f"{height:.0f}")


def test_svg_edge_labels_sit_beside_their_lines_on_a_background() -> None:
    root = _svg(_bookinfo())
    edges = [g for g in root.iter(f"{SVG}g") if g.get("class") == "edge"]
    lines = 0
    for edge in edges:
        (label,) = [g for g in edge if g.get("class") == "label"]
        rect = label.find(f"{SVG}rect")
        assert rect is not None and rect.get("fill") == "white"
        rx, ry = float(rect.get("x") or 0), float(rect.get("y") or 0)
        rw, rh = float(rect.get("width") or 0), float(rect.get("height") or 0)
        line = edge.find(f"{SVG}line")
        if line is None:
            continue  # the self-loop: a path, its label above it
        lines += 1
        x1, y1, x2, y2 = (float(line.get(k) or 0) for k in ("x1", "y1", "x2", "y2"))
        for i in range(101):  # no point of the line (its midpoint included) under the label
            px, py = x1 + (x2 - x1) * i / 100, y1 + (y2 - y1) * i / 100
            assert not (rx <= px <= rx + rw and ry <= py <= ry + rh), (edge[0].text, i)
    assert lines == 6


def test_graph_prints_json_and_yaml_in_the_documented_shape(
    chain: dict[str, ServerHandle], capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    import yaml

    _drive(chain, ok=3, fail=1)
    urls = [chain[n].url for n in ("a", "b")]
    assert cli.main(["graph", *urls, "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == {
        "window_seconds": None,
        "scraped": 2,
        "nodes": ["a.default", "b.default", "c.default", "unauthenticated"],
        "ingress": [],
        "edges": [
            {
                "source": "a.default",
                "destination": "b.default",
                "requests": 4.0,
                "successes": 3.0,
                "success_rate": 0.75,
                "rate": None,
                "seen_by": "both",
            },
            {
                "source": "b.default",
                "destination": "c.default",
                "requests": 4.0,
                "successes": 3.0,
                "success_rate": 0.75,
                "rate": None,
                "seen_by": "caller",
            },
            {
                "source": "unauthenticated",
                "destination": "a.default",
                "requests": 4.0,
                "successes": 3.0,
                "success_rate": 0.75,
                "rate": None,
                "seen_by": "callee",
            },
        ],
    }
    assert cli.main(["graph", *urls, "-o", "yaml"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == data
    assert cli.main(["graph", *urls, "-o", "json", "--format", "svg"]) == 2
    assert "drop --format" in capsys.readouterr().err
