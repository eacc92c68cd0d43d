"""Access log, admin app and meshctl status/tap/top on a tiny live mesh.

    python examples/observe.py

One backend (a standard-library HTTP server) plays ``reviews``; ``ratings`` points at a closed
port. The policy turns on the text access log; the admin app is served on a localhost port;
then a few calls (some failing, each for its own reason), a rejected reload, and the three
``meshctl`` verbs reading the admin app.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import uvicorn

import meshlib
from meshlib.cli import main as meshctl


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"great product"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


POLICY = """\
apiVersion: meshlib/v1
kind: Mesh
metadata: {{name: mesh}}
spec:
  accessLog: {{enabled: true, format: text}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews}}
spec: {{endpoints: [{{address: "127.0.0.1:{port}"}}]}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: ratings}}
spec: {{endpoints: [{{address: "127.0.0.1:1"}}]}}
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {{name: ratings-policy}}
spec:
  target: {{service: ratings}}
  retries: {{attempts: 0}}
  circuitBreaker: {{consecutiveFailures: 2, openDuration: 30s}}
"""


def serve_admin(app: object) -> tuple[uvicorn.Server, threading.Thread]:
    """The admin app on its own localhost port (it exposes config: never on a public one)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    started = threading.Event()

    def run() -> None:
        server.run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        started.wait(0.01)
    return server, thread


def main() -> None:
    access = logging.getLogger("meshlib.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("access: %(message)s"))
    access.addHandler(handler)
    access.propagate = False

    backend = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    backend_thread = threading.Thread(target=backend.serve_forever, daemon=True)
    backend_thread.start()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mesh.yaml"
        path.write_text(POLICY.format(port=backend.server_address[1]))
        mesh = meshlib.Mesh.from_file(path, service="productpage", watch=False)
        server, thread = serve_admin(mesh.admin_app())
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        try:
            with mesh.client() as client:
                for n in range(6):
                    client.get(f"http://reviews/reviews/{n}")
                for _ in range(3):  # two connect failures trip the breaker; the third is refused
                    try:
                        client.get("http://ratings/ratings/1")
                    except httpx.HTTPError as exc:  # the decision says why, as the log does
                        print(f"ratings: {type(exc).__name__} ({exc.decision.reason})")  # type: ignore[attr-defined]
                with mesh.inject_fault("reviews", abort=503):
                    client.get("http://reviews/reviews/fault")
            path.write_text(path.read_text().replace("format: text", "format: xml"))
            print("reload applied:", mesh.reload())

            print("\n$ meshctl status", url)
            meshctl(["status", url])
            print("\n$ meshctl top", url)
            meshctl(["top", url])
            print("\n$ meshctl tap", url, "--destination ratings --seconds 0.2")
            meshctl(["tap", url, "--destination", "ratings", "--seconds", "0.2"])
        finally:
            server.should_exit = True
            thread.join(5)
            mesh.close()
            backend.shutdown()
            backend.server_close()
            backend_thread.join()


if __name__ == "__main__":
    main()
