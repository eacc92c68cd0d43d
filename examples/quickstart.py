"""The smallest useful meshlib program: one backend, a policy file, one call, its decision.

    python examples/quickstart.py

The backend is a standard-library HTTP server on a free 127.0.0.1 port; any HTTP server works.
"""

from __future__ import annotations

import json
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import meshlib


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"reviews": ["great product"]}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep the output short
        pass


POLICY = """\
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews}}
spec:
  endpoints: [{{address: "127.0.0.1:{port}"}}]
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: reviews-policy}}
spec:
  target: {{service: reviews}}
  timeout: 2s
  retries: {{attempts: 2, perTryTimeout: 500ms, retryOn: [5xx, reset]}}
"""


def main() -> None:
    backend = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "mesh.yaml"
            path.write_text(POLICY.format(port=backend.server_address[1]))

            with (
                meshlib.Mesh.from_file(path, service="productpage") as mesh,
                mesh.client() as client,
            ):
                response = client.get("http://reviews/reviews/1")  # `reviews` is a mesh service
                decision = response.extensions["mesh_decision"]
                print("status:", response.status_code)
                print("body:", response.text)
                print("decision:", json.dumps(decision.as_dict(), indent=2))
                print(
                    f"called {decision.service} at {decision.attempts[0].endpoint}"
                    f" (snapshot {decision.snapshot_version}, deadline {decision.deadline}s)"
                )
    finally:
        backend.shutdown()
        backend.server_close()
        thread.join()


if __name__ == "__main__":
    main()
