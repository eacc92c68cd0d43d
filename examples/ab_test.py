"""A/B test by header: Firefox users get reviews-v2, everyone else stays on reviews (v1).

An SMI HTTPRouteGroup names the match (``user-agent`` matching ``.*Firefox.*``); a TrafficSplit
with ``matches`` applies only to requests that match it, and the rest go to the root service.

    python examples/ab_test.py --calls 20
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import meshlib

POLICY = """\
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews}}          # the root: v1 lives here
spec: {{endpoints: [{{address: "127.0.0.1:{v1}"}}]}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews-v2}}
spec: {{endpoints: [{{address: "127.0.0.1:{v2}"}}]}}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{name: ab-test}}
spec:
  matches:
  - name: firefox-users
    headers: {{user-agent: ".*Firefox.*"}}
    pathRegex: "/reviews.*"
    methods: ["GET"]
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {{name: reviews-ab}}
spec:
  service: reviews
  backends: [{{service: reviews-v2, weight: 100}}]
  matches: [{{kind: HTTPRouteGroup, name: ab-test}}]
"""

AGENTS = {
    "firefox": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "chrome": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari/537.36",
    "curl": "curl/8.5.0",
}


def backend(version: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = version.encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, name=f"reviews-{version}", daemon=True).start()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description="header-based A/B test")
    parser.add_argument("--calls", type=int, default=20, help="calls per user agent")
    args = parser.parse_args()

    servers = [backend("v1"), backend("v2")]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mesh.yaml"
            v1, v2 = (s.server_address[1] for s in servers)
            path.write_text(POLICY.format(v1=v1, v2=v2))
            with (
                meshlib.Mesh.from_file(path, service="productpage") as mesh,
                mesh.client() as client,
            ):
                seen: dict[str, Counter[str]] = {}
                for name, agent in AGENTS.items():
                    seen[name] = Counter()
                    for i in range(args.calls):
                        r = client.get(f"http://reviews/reviews/{i}", headers={"user-agent": agent})
                        d = r.extensions["mesh_decision"]
                        seen[name][f"{r.text} (route {d.route}, backend {d.backend})"] += 1
                for name, counts in seen.items():
                    for what, n in counts.items():
                        print(f"{name:<8} → {what}: {n} calls")
                ok = set(seen["firefox"]) == {
                    "v2 (route firefox-users, backend reviews-v2.default)"
                } and all(
                    set(seen[n]) == {"v1 (route None, backend reviews.default)"}
                    for n in ("chrome", "curl")
                )
                print("A/B split as configured" if ok else "A/B split NOT as configured")
                return 0 if ok else 1
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


if __name__ == "__main__":
    raise SystemExit(main())
