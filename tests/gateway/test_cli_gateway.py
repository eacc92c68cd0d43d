"""``meshctl gateway validate`` and ``meshctl gateway serve``: the latter as a real subprocess on
a free port in front of a real echo backend, one request through it, stopped with SIGTERM
(issue 14)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshlib.cli.main import main
from tests.gateway.fixtures import gateway_policy, web_gateway
from tests.harness.echo import EchoBackend
from tests.harness.processes import Processes

MESHCTL = (sys.executable, "-m", "meshlib.cli")

GATEWAY = web_gateway(hostnames="[shop.example.com]")


def test_validate_accepts_a_config_and_names_every_problem_by_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "gateway.yaml"
    good.write_text(GATEWAY)
    assert main(["gateway", "validate", "--config", str(good)]) == 0
    assert "ok (edge/edge; 1 HTTPRoutes" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(GATEWAY.replace("port: 80,", "port: 0,").replace("name: edge}]", "name: x}]"))
    assert main(["gateway", "validate", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:7" in err and "port" in err  # the listener's port, on its line
    assert f"{bad}:13" in err and "no Gateway edge/x" in err
    assert "2 problems found" in err


def test_validate_reads_files_as_policy_files_are_and_names_each_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Read as the mesh policy is: a byte that is not UTF-8 is named with its line, and a file
    # that cannot be read does not hide the problems of the others.
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(GATEWAY.encode().replace(b"name: web,", b"name: w\xe9b,", 1))
    missing = tmp_path / "missing.yaml"
    assert main(["gateway", "validate", "--config", str(latin), "--config", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"{latin}:7" in err and "not valid UTF-8" in err
    assert f"{missing}" in err and "cannot read file" in err
    assert "2 problems found" in err


def test_serve_refuses_an_unknown_listener_in_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(GATEWAY)
    assert main(["gateway", "serve", "--config", str(config), "--port", "nope=1"]) == 2
    assert "no listener 'nope'; the listeners: web" in capsys.readouterr().err


def test_serve_refuses_a_malformed_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(GATEWAY)
    args = ["gateway", "serve", "--config", str(config), "--rate-limit-per-subject", "20/d"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--rate-limit-per-subject" in err and "'20/d' is not a rate" in err


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path)
    yield running
    running.stop()


@pytest.mark.timeout(60)
def test_serve_forwards_limits_reports_metrics_and_stops_on_sigterm(
    tmp_path: Path, processes: Processes, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = EchoBackend("web")
    backend.serve()
    try:
        config = tmp_path / "gateway.yaml"
        config.write_text(GATEWAY)
        policy = tmp_path / "policy.yaml"
        policy.write_text(gateway_policy({"shop/web": backend.port}))
        child = processes.start(
            "gateway",
            [
                *MESHCTL,
                "gateway",
                "serve",
                "--config",
                str(config),
                "--port",
                "web=0",
                "--rate-limit-per-ip",
                "1/m:1",
                "--metrics-port",
                "0",
            ],
            env={
                "MESHLIB_SERVICE": "gateway",
                "MESHLIB_NAMESPACE": "edge",
                "MESHLIB_POLICY": str(policy),
            },
        )
        line = child.line("listening: 80 -> ", timeout=30)
        url = line.split(" -> ", 1)[1]
        assert url.startswith("http://127.0.0.1:")
        response = httpx.get(url + "/hello", headers={"host": "shop.example.com"}, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()["backend"] == "web"
        assert response.json()["headers"]["x-forwarded-host"] == "shop.example.com"
        refused = httpx.get(url + "/hello", headers={"host": "shop.example.com"}, timeout=10)
        assert refused.status_code == 429  # --rate-limit-per-ip 1/m:1
        assert refused.headers["retry-after"] == "60"
        assert backend.requests == 1
        # meshctl graph on the gateway's metrics: outside → gateway (the entry) → web
        metrics = child.line("metrics: ", timeout=10).split(" ", 1)[1]
        assert metrics.startswith("http://127.0.0.1:")
        assert main(["graph", metrics]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1] == (
            "entry: gateway.edge (ingress gateway edge/edge): outside → gateway.edge → services"
        )
        assert [line.split()[:5] for line in out[4:]] == [
            ["gateway.edge", "[ingress]", "→", "web.shop", "1"],
            ["outside", "→", "gateway.edge", "[ingress]", "2"],
        ]
        child.signal(signal.SIGTERM)
        assert child.popen.wait(timeout=20) == 0, child.stderr()
    finally:
        backend.stop()
