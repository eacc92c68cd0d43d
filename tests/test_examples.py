"""Every file in examples/ runs, as a user would run it, and says what it should.

A new example must be added to ``EXPECTED`` (its arguments and the lines proving it worked),
so no example can rot unnoticed; docs point at these files for their code snippets.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshlib.config.loader import load_text
from meshlib.config.model import Snapshot
from meshlib.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: file name → (command-line arguments, regular expressions the output must contain);
#: ``{tmp}`` in an argument is a fresh temporary directory (files an example writes).
EXPECTED: dict[str, tuple[list[str], list[str]]] = {
    "quickstart.py": (
        [],
        [
            r"^status: 200$",
            r'"service": "reviews\.default"',
            r"^called reviews\.default at 127\.0\.0\.1:\d+ \(snapshot \d+, deadline 2\.0s\)$",
        ],
    ),
    "ab_test.py": (
        ["--calls", "5"],
        [
            r"^firefox  → v2 \(route firefox-users, backend reviews-v2\.default\): 5 calls$",
            r"^chrome   → v1 \(route None, backend reviews\.default\): 5 calls$",
            r"^curl     → v1 \(route None, backend reviews\.default\): 5 calls$",
            r"^A/B split as configured$",
        ],
    ),
    "gateway_demo.py": (
        [],
        [
            r"^registry serving on https://127\.0\.0\.1:\d+ \(pid \d+\)$",
            r"^\$ meshctl apply -f \S+mesh\.yaml\n  applied version 1$",
            r"^  serving productpage on https://127\.0\.0\.1:\d+ \(pid \d+\)$",
            r"^  \S+gateway\.yaml: ok \(edge/bookinfo; 2 HTTPRoutes, 1 TLS Secrets, "
            r"0 CA ConfigMaps\)$",
            r"^  listening: 80 -> http://127\.0\.0\.1:\d+\n"
            r"  listening: 443 -> https://127\.0\.0\.1:\d+$",
            # HTTP → HTTPS by the HTTP listener's redirect route
            r"^  GET http://bookinfo\.example/productpage → 301, "
            r"Location: https://bookinfo\.example/productpage$",
            # TLS terminated with the Secret's certificate, chosen by SNI
            r"^  GET https://bookinfo\.example/productpage → 200 "
            r"\(certificate bookinfo\.example, issued by gateway demo CA\)$",
            # re-encrypted: each hop saw its caller's verified SPIFFE ID
            r"^    productpage saw caller spiffe://bookinfo\.local/ns/edge/sa/gateway$",
            r"^    reviews answered by reviews-v[12] at 127\.0\.0\.1:\d+, which saw caller "
            r"spiffe://bookinfo\.local/ns/default/sa/productpage$",
            r"^  forged x-mesh-identity: spiffe://bookinfo\.local/ns/default/sa/productpage → 200; "
            r"productpage saw spiffe://bookinfo\.local/ns/edge/sa/gateway "
            r"\(the forged header never reached it\)$",
            r"^  GET https://bookinfo\.example/reviews → 403 \(x-mesh-reason: denied\)",
            r"^  SNI other\.example: refused in the handshake \(\w+\)$",
            r"^  direct to productpage https://127\.0\.0\.1:\d+ without a client certificate: "
            r"refused \(\w+\)$",
            r"^  a burst of 50 sequential requests through the gateway: 50 answered 200, "
            r"p50 [\d.]+ ms, max [\d.]+ ms \(.*reviews-v1 [1-9]\d*, reviews-v2 [1-9]\d*\)$",
            r"^stopped 5 processes \(pids [\d ]+\); still running: 0$",
        ],
    ),
    "observe.py": (
        [],
        [
            r"^ratings: CircuitOpenError \(circuit_open\)$",
            r'^access: .*-> reviews\.default "GET reviews/reviews/fault" 503 fault_injected',
            r"^last rejected: .*\(kept version 1\), 1 problem\(s\):$",
            r"spec\.accessLog\.format: 'xml' is not one of json, text$",
            r"^ratings\.default +127\.0\.0\.1:1 +healthy +[\d.]+ms +0 +2 +open +[\d.]+ retries$",
            r"^outbound +productpage\.default +reviews\.default +- +7 +[\d.]+/s +85\.7% +[\d.]+ms",
            r"^outbound +productpage\.default +ratings\.default +- +3 +[\d.]+/s +0\.0% +[\d.]+ms",
            r'-> ratings\.default "GET ratings/ratings/1" 503 circuit_open [\d.]+ms attempts=0$',
        ],
    ),
    "demo.py": (
        ["--duration", "2", "--out", "{tmp}"],
        [
            r"traffic for 2s, 8 calls in flight",
            r"calls +\d+ +success +\d+\.\d+% +\d+\.\d+ rps",
            r"^edge +requests +success +p50 ms +p99 ms +retries$",
            r"^productpage → reviews-v1 +[1-9]\d* +\d+\.\d+% +[\d.]+ +[\d.]+ +\d+$",
            r"^reviews → ratings +[1-9]\d* +\d+\.\d+%",
            r"^What each policy did$",
            r"reviews-v2 got \d+ of [1-9]\d* calls: [\d.]+% observed, 10% configured",
            r"\d+ retries performed; \d+ of \d+ retried calls rescued",
            r"retry budget exhausted: \d+; deadline exceeded: \d+",
            r"aborts injected: \d+ of [1-9]\d* ratings calls",
            r"delays injected: \d+",
            r"^  Mesh mtls: strict \(trust domain bookinfo\.local, one CA, 4 SVIDs\)$",
            r"every edge encrypted and authenticated: [1-9]\d* requests from verified SPIFFE IDs",
            r"\(sa productpage, reviews\), 0 without a certificate$",
            r"^    plain HTTP client: refused \(\w+\)$",
            r"^    TLS client without a certificate: refused \(\w+\)$",
            r"^    [1-9]\d* calls allowed; intruder denied 403 \(x-mesh-reason: denied\):$",
            r"metrics: mesh_requests_total [1-9]\d*, mesh_retries_total \d+",
            r"^productpage: [1-9]\d* calls, \d+\.\d% answered without a 5xx$",
            # the Observe pillar on the live services: a sampled trace, then meshctl verbs
            r"^  [1-9]\d* traces sampled \(5% of productpage's calls start one\)",
            # a call with one attempt is one CLIENT span; the upstream's SERVER span its child.
            # The trace shown may hold a retry: then attempt 1's status is on the call's line
            # (an event of the call span) and attempt 2 is a span of its own.
            r"^  productpage CLIENT GET reviews → reviews-v[12] \(deadline 1000 ms, .*"
            r"attempt 1 → 127\.0\.0\.1:\d+(?: \d{3})?\)  \d{3}$",
            r"^    reviews-v[12] +SERVER GET /reviews/\d+ \(from sa/productpage, \d+ ms left\)",
            r"^\$ meshctl status http://127\.0\.0\.1:\d+$",
            r"^reviews-v1\.default +127\.0\.0\.1:\d+ +healthy .* closed",
            # the route column: the HTTPRoute's name (its one rule has no name of its own)
            r"^outbound +productpage\.default +reviews-v1\.default +reviews-canary +[1-9]\d* "
            r"+[\d.]+/s +[\d.]+%",
            r"^\$ meshctl tap http://127\.0\.0\.1:\d+ --limit 5$",
            r'(inbound  <- spiffe://bookinfo\.local/ns/default/sa/productpage "GET reviews/reviews/'
            r'|outbound -> ratings\.default "GET ratings/ratings/)',
            r"^service graph: 4 services, 4 edges \(totals since start, 4 scraped\)$",
            r"^productpage\.default → reviews-v1\.default +[1-9]\d* +- +[\d.]+% +both$",
            r"^reviews-v1\.default → ratings\.default +[1-9]\d* +- +[\d.]+% +both$",
            r"^service graph written to .*demo-graph\.svg and demo-graph\.html$",
        ],
    ),
    "registry_demo.py": (
        ["--seconds", "2"],
        [
            r"^registry serving on https://127\.0\.0\.1:\d+ \(pid \d+\)$",
            r"^\$ meshctl apply -f \S+v100\.yaml\n  applied version 1$",
            r"^  serving reviews-v2 on https://127\.0\.0\.1:\d+ \(pid \d+\)$",
            r"^  reviews-v1 100\.0% of [1-9]\d* calls$",
            r"^  canary 90/10: first call on reviews-v2 [\d.]+ s after the registry accepted",
            r"^\$ meshctl registry status\n  epoch: .*\n  state: +(serving|warming)",
            r"^  its traffic moved: gone from the callers' endpoints [\d.]+ s after the kill",
            r"^  reviews-v1 calls since the kill: [1-9]\d* on \S+, 0 on \S+$",
            r"^  failed calls since the kill: 0 of [1-9]\d*$",
            r"^stopped 5 processes \(pids [\d ]+\); still running: 0$",
        ],
    ),
    "registry_workload.py": (
        ["--help"],  # a workload needs a registry: registry_demo.py runs it for real
        [r"MESHLIB_REGISTRY, MESHLIB_SERVICE,\s+MESHLIB_SVID_DIR"],
    ),
    "tracing_chain.py": (
        [],
        [
            r"^GET /checkout: 200 42 in stock; 42 in stock$",
            r"^one trace, 9 spans$",
            r"^frontend +SERVER GET /checkout +200$",
            # one attempt: the call's one CLIENT span, the upstream's SERVER span its child
            r"^  frontend +CLIENT GET catalog \(call, deadline \d+ ms, "
            r"attempt 1 → 127\.0\.0\.1:\d+\) +200$",
            r"^    catalog +SERVER GET /items +200$",
            # a retry: the first attempt on the call span (its server span a child), the
            # second a span of its own under the call
            r"^      catalog +CLIENT GET inventory \(call, deadline \d+ ms, "
            r"attempt 1 → 127\.0\.0\.1:\d+ 503\) +200$",
            r"^        inventory +SERVER GET /stock/\d +503$",
            r"^        catalog +CLIENT attempt 2 → 127\.0\.0\.1:\d+ +200$",
            r"^          inventory +SERVER GET /stock/\d +200$",
        ],
    ),
}


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, tmp_path: Path) -> None:
    args, patterns = EXPECTED[name]
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *(a.replace("{tmp}", str(tmp_path)) for a in args)],
        capture_output=True,
        timeout=100,
        cwd=EXAMPLES.parent,
    )
    # Bytes, decoded here: text mode's universal newlines would turn a "\r" into "\n".
    output = done.stdout.decode("utf-8")
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0, f"{name} exited {done.returncode}\n{output}\n{stderr}"
    for pattern in patterns:
        assert re.search(pattern, output, re.MULTILINE), f"{pattern!r} not in output:\n{output}"
    assert "Traceback" not in stderr, stderr
    assert "\r" not in output  # piped: no line is redrawn in place (the demo's progress line)
    if name == "demo.py":  # meshctl graph wrote the service graph where it was told
        assert (tmp_path / "demo-graph.svg").read_text().startswith("<svg ")
        assert "reviews-v1.default → ratings.default" in (tmp_path / "demo-graph.html").read_text()
    if name == "registry_demo.py":
        check_registry_demo(output)
    if name in ("registry_demo.py", "gateway_demo.py"):
        check_stopped(output)


def check_registry_demo(output: str) -> None:
    """Each split's observed share is its weight within 5 binomial sigmas."""
    splits = re.findall(r"^  split \d+/(\d+): reviews-v2 ([\d.]+)% of (\d+) calls", output, re.M)
    assert [weight for weight, _, _ in splits] == ["10", "50"], output
    for weight, observed, calls in splits:
        p, n = int(weight) / 100, int(calls)
        assert n >= 50, f"too few calls for a share: {n}"
        # + 0.0005: the demo prints the share rounded to 0.1 %
        assert abs(float(observed) / 100 - p) <= 5 * math.sqrt(p * (1 - p) / n) + 0.0005


def check_stopped(output: str) -> None:
    """Every process a multi-process demo started is gone once it exited."""
    pids = re.search(r"^stopped \d+ processes \(pids ([\d ]+)\)", output, re.M)
    assert pids is not None
    for pid in map(int, pids.group(1).split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --- the docs show real code ------------------------------------------------------------------

ROOT = EXAMPLES.parent
DOCS = [
    ROOT / "README.md",
    ROOT / "docs" / "quickstart.md",
    ROOT / "docs" / "concepts.md",
    ROOT / "docs" / "testing.md",
    ROOT / "docs" / "observability.md",
    ROOT / "docs" / "control-plane.md",
    ROOT / "docs" / "policy-reference.md",
    ROOT / "docs" / "gateway-api.md",
    *sorted((ROOT / "docs" / "features").glob("*.md")),
]
FEATURES = [
    "httproute",
    "gateway",
    "routing-and-splits",
    "load-balancing",
    "retries",
    "timeouts",
    "circuit-breaking",
    "outlier-detection",
    "hedging",
    "rate-limits",
    "fault-injection",
    "mirroring",
    "hot-reload",
    "decisions-and-errors",
    "inbound",
    "authorization",
    "origin-authentication",
    "access-logs",
    "admin",
    "metrics",
    "tracing",
]
_CODE = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


_UNDECLARED = re.compile(r"service '([a-z0-9-]+)' is not declared in namespace '([a-z0-9-]+)'")


def load_example(code: str, source: str) -> Snapshot:
    """A docs YAML block loaded as a policy, with a stub ``Service`` for every service it names
    but does not declare: the ones SMI and meshlib kinds name (``service:``, ``mirror:``), then
    each one the loader reports (an HTTPRoute's parentRefs are errors, its backendRefs warnings),
    so an example shows only what it is about. Other warnings (an identity no Service uses) are
    the example's own business."""
    named = {(n, "default") for n in re.findall(r"(?:service|mirror):\s*([a-z0-9-]+)", code)}
    stated = re.findall(r"kind: Service\nmetadata: \{name: ([a-z0-9-]+)", code)
    declared = {(n, "default") for n in stated}
    missing = named - declared
    for _ in range(5):  # each round declares what the last one found missing; bounded
        stubs = "".join(
            "---\napiVersion: meshlib/v1\nkind: Service\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\n"
            "spec: {endpoints: [{address: '127.0.0.1:9'}]}\n"
            for name, ns in sorted(missing)
        )
        try:
            snapshot = load_text(code + "\n" + stubs, source=source)
        except ConfigError as exc:
            found = {m.groups() for p in exc.problems for m in _UNDECLARED.finditer(p.message)}
            if not found - missing:
                raise
            missing |= found
            continue
        found = {m.groups() for p in snapshot.warnings for m in _UNDECLARED.finditer(p.message)}
        if found - missing:
            missing |= found
            continue
        return snapshot
    raise AssertionError(f"{source}: services still undeclared after 5 rounds: {missing}")


def test_quickstart_lists_every_runtime_dependency() -> None:
    from importlib.metadata import requires

    runtime = [r for r in requires("meshlib") or [] if "extra ==" not in r]
    names = sorted(re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower() for r in runtime)
    table = re.findall(r"^\| ([\w.-]+) \|", (ROOT / "docs" / "quickstart.md").read_text(), re.M)
    assert names and sorted(n.lower() for n in table[1:]) == names  # table[0]: the header row


def test_every_feature_has_a_page() -> None:
    pages = sorted(p.stem for p in (ROOT / "docs" / "features").glob("*.md"))
    assert pages == sorted(FEATURES)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_snippets_and_links_are_real(doc: Path) -> None:
    import ast
    import importlib.util

    from prometheus_client import CollectorRegistry

    import meshlib

    mesh = meshlib.Mesh.from_text(
        "apiVersion: meshlib/v1\nkind: Service\nmetadata: {name: reviews}\nspec: {}\n",
        service="docs",
        registry=CollectorRegistry(),
    )
    text = doc.read_text()
    for lang, code in _CODE.findall(text):
        if lang == "python":  # parses (top-level await allowed), names only real API
            compile(
                code, str(doc), "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
            )
            code = re.sub(r"#.*", "", code)  # names in comments are prose
            for name in re.findall(r"\bmeshlib\.([A-Za-z_]\w*)", code):
                # an attribute of the package, or a subpackage a snippet imports from
                known = hasattr(meshlib, name) or importlib.util.find_spec(f"meshlib.{name}")
                assert known, f"{doc}: meshlib.{name}"
            for name in re.findall(r"(?<![\"/\w])mesh\.([A-Za-z_]\w*)", code):
                assert hasattr(mesh, name), f"{doc}: mesh.{name}"
        elif lang == "yaml":  # a valid policy, once the services it names are declared
            load_example(code, doc.name)  # raises ConfigError if not
    mesh.close()
    for target in _LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)}: broken link {target}"


#: Pages that show a route or split: the Gateway API form comes first, SMI after (issue 14).
HTTPROUTE_FIRST = [
    ROOT / "docs" / "quickstart.md",
    ROOT / "docs" / "policy-reference.md",
    ROOT / "docs" / "features" / "routing-and-splits.md",
    ROOT / "docs" / "features" / "httproute.md",
]


@pytest.mark.parametrize("doc", HTTPROUTE_FIRST, ids=lambda p: p.name)
def test_route_examples_show_httproute_first(doc: Path) -> None:
    """The first YAML block with a route or split is an HTTPRoute, and every block with one
    loads into the snapshot's routes (an HTTPRoute that did not attach would be lost)."""
    blocks = [code for lang, code in _CODE.findall(doc.read_text()) if lang == "yaml"]
    routed = [c for c in blocks if re.search(r"^kind: (HTTPRoute|TrafficSplit)$", c, re.M)]
    assert routed, f"{doc.name}: no route example"
    assert re.search(r"^kind: HTTPRoute$", routed[0], re.M), f"{doc.name}: SMI shown first"
    for code in routed:
        snapshot = load_example(code, doc.name)
        expected = len(re.findall(r"^kind: HTTPRoute$", code, re.M))
        assert len(snapshot.http_routes) == expected
