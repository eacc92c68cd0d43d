"""Run nginx as a keep-alive reverse proxy (a stand-in for a sidecar) for the benchmarks.

nginx runs in the foreground (``-g 'daemon off;'``) as a child process, from a temporary
directory that holds its own configuration, pid file, error log and temp paths, so it touches
nothing of the system nginx. It listens on 127.0.0.1 only.

    with Nginx(upstream_port=8000) as proxy:
        httpx.get(f"http://127.0.0.1:{proxy.port}/")
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")

CONFIG_TEMPLATE = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    upstream u {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
        keepalive_timeout 300s;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
{tls_server}}}
"""

# A second server block for a TLS-terminating listener (an ingress proxy's HTTPS port): the same
# upstream, the certificate and key from files.
TLS_SERVER_TEMPLATE = """\
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://u;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def find_nginx() -> str | None:
    """The nginx binary: ``$NGINX``, then the usual paths, then ``$PATH``; None if absent."""
    explicit = os.environ.get("NGINX")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for candidate in NGINX_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nginx")


def nginx_version(binary: str) -> str:
    """``nginx/1.22.1`` or similar (nginx prints its version on stderr)."""
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (out.stderr or out.stdout).strip().split(":", 1)[-1].strip()


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (callers retry if they lose the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Block until 127.0.0.1:port accepts a connection; raise if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"nothing listening on 127.0.0.1:{port} after {timeout}s"
                ) from None
            time.sleep(0.02)


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 5.0
) -> None:
    """Send ``sig``, wait up to ``grace`` seconds, then kill; always reaps the child."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
        except ProcessLookupError:
            pass
    else:
        proc.wait()


def _proc_cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        fields = fh.read().rsplit(b")", 1)[1].split()
    # after the ")" of comm: state is field 3 overall, utime 14, stime 15 -> indices 11, 12 here
    return int(fields[11]) + int(fields[12])


def process_cpu_seconds(pids: list[int]) -> float:
    """User+system CPU seconds consumed so far by ``pids`` (from /proc; clock-tick resolution)."""
    ticks = 0
    for pid in pids:
        try:
            ticks += _proc_cpu_ticks(pid)
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx workers of a master), found by scanning /proc."""
    children: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


class Nginx:
    """One nginx master + 1 worker proxying 127.0.0.1:port to 127.0.0.1:upstream_port; with
    ``tls=(certificate file, key file)`` also 127.0.0.1:tls_port, terminating TLS."""

    def __init__(
        self,
        upstream_port: int,
        binary: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        found = binary or find_nginx()
        if found is None:
            raise FileNotFoundError("nginx binary not found (set $NGINX)")
        self.binary = found
        self.upstream_port = upstream_port
        self.port = 0
        self.tls = tls
        self.tls_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmp: Path | None = None

    def start(self, timeout: float = 10.0, tries: int = 3) -> Nginx:
        self.tmp = Path(tempfile.mkdtemp(prefix="meshlib-bench-nginx-"))
        # Workers run as an unprivileged user when the master is root: let them reach temp paths.
        os.chmod(self.tmp, 0o755)
        last_error: Exception | None = None
        for _ in range(tries):
            self.port = free_port()
            tls_server = ""
            if self.tls is not None:
                self.tls_port = free_port()
                cert, key = self.tls
                tls_server = TLS_SERVER_TEMPLATE.format(tls_port=self.tls_port, cert=cert, key=key)
            conf = self.tmp / "nginx.conf"
            conf.write_text(
                CONFIG_TEMPLATE.format(
                    tmp=self.tmp,
                    port=self.port,
                    upstream_port=self.upstream_port,
                    tls_server=tls_server,
                )
            )
            cmd = [
                self.binary,
                "-p",
                str(self.tmp),
                "-e",
                str(self.tmp / "error.log"),
                "-c",
                str(conf),
                "-g",
                "daemon off;",
            ]
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C reaches the benchmark, which stops us
            )
            try:
                wait_for_port(self.port, self.proc, timeout)
                if self.tls is not None:
                    wait_for_port(self.tls_port, self.proc, timeout)
                return self
            except (RuntimeError, TimeoutError) as exc:  # lost the port race, or a bad config
                last_error = exc
                stop_process(self.proc, signal.SIGTERM)
                self.proc = None
        raise RuntimeError(f"nginx did not start: {last_error}; log:\n{self.error_log()}")

    def error_log(self) -> str:
        if self.tmp is None:
            return ""
        try:
            return (self.tmp / "error.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """Master and worker pids (for CPU accounting)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *child_pids(self.proc.pid)]

    def stop(self) -> None:
        """Graceful stop (SIGQUIT), escalating to SIGKILL; removes the temp directory."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGQUIT)
            self.proc = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> Nginx:
        return self.start() if self.proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
