"""``meshctl registry init|serve``: the data dir's files, modes and identities; serve as a real
process, stopped by SIGTERM; one process per data dir."""

from __future__ import annotations

import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from etcd_cluster import EtcdCluster

from meshlib.cli.main import main
from meshlib.control.client import RegistryClient, RegistryRefused
from meshlib.identity import SpiffeID
from meshlib.identity.csr import make_csr
from meshlib.identity.svid import spiffe_id_of
from meshlib.identity.tls import SVIDSource

pytestmark = pytest.mark.timeout(30)

TD = "shop.test"
#: ``meshctl registry serve`` on a free port, as a process; the data dir goes last.
SERVE: tuple[str, ...] = (sys.executable, "-m", "meshlib.cli", "registry", "serve")
SERVE += ("--listen", "127.0.0.1:0", "--data")
MESH = "apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: m}\nspec: {trustDomain: shop.test}\n"


def leaf_id(svid_dir: Path) -> str:
    cert = x509.load_pem_x509_certificates((svid_dir / "cert.pem").read_bytes())[0]
    return str(spiffe_id_of(cert))


def test_init_writes_the_ca_and_both_svids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "reg"
    assert main(["registry", "init", "--data", str(data), "--trust-domain", TD]) == 0
    assert (data / "ca" / "ca.pem").exists()
    assert (data / "ca" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    for name, sa in (("registry", "registry"), ("admin", "meshctl")):
        for file in ("cert.pem", "key.pem", "bundle.pem"):
            assert (data / name / file).exists(), f"{name}/{file}"
        assert (data / name / "key.pem").stat().st_mode & 0o777 == 0o600
        assert leaf_id(data / name) == f"spiffe://{TD}/ns/meshlib-system/sa/{sa}"
    assert "meshctl's admin SVID" in capsys.readouterr().out

    # again: the CA is kept, the SVIDs re-issued; another trust domain is refused
    root = (data / "ca" / "ca.pem").read_bytes()
    assert main(["registry", "init", "--data", str(data)]) == 0
    assert (data / "ca" / "ca.pem").read_bytes() == root
    assert main(["registry", "init", "--data", str(data), "--trust-domain", "other.test"]) == 1
    assert "not other.test" in capsys.readouterr().err


def test_serve_without_init_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["registry", "serve", "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("meshctl registry serve:") and "registry init" in err
    assert len(err.splitlines()) == 1
    assert main(["registry", "serve", "--data", str(tmp_path), "--listen", "nope"]) == 2
    assert main(["registry", "serve", "--data", str(tmp_path), "--svid-ttl", "soon"]) == 2
    assert "--svid-ttl" in capsys.readouterr().err
    for bad in ("soon", "0.5s", "301s"):
        assert main(["registry", "serve", "--data", str(tmp_path), "--instance-ttl", bad]) == 2
        assert "--instance-ttl" in capsys.readouterr().err


def test_instance_ttl_sets_the_default_ttl_and_one_ttl_of_warming() -> None:
    from meshlib.cli.registry import instance_settings

    settings = instance_settings("3s")
    assert (settings.default_ttl, settings.warming) == (3.0, 3.0)


def _serve(data: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SERVE, str(data), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _first_line(process: subprocess.Popen[str], timeout: float = 20.0) -> str:
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        assert selector.select(timeout), "the registry printed nothing"
    return process.stdout.readline().strip()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str], str]]:
    data = tmp_path / "reg"
    assert main(["registry", "init", "--data", str(data), "--trust-domain", TD]) == 0
    process = _serve(data)
    try:
        line = _first_line(process)
        assert line.startswith("registry serving on https://127.0.0.1:"), line
        yield data, process, line.split()[3]
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


@pytest.mark.timeout(60)
def test_serve_answers_over_mtls_and_stops_on_sigterm(
    served: tuple[Path, subprocess.Popen[str], str],
) -> None:
    data, process, url = served
    with RegistryClient(url, svid_dir=str(data / "admin")) as client:
        assert client.apply(MESH).version == 1
        status = client.status()
    assert status.store == f"sqlite:{data / 'registry.db'}"
    admin = SVIDSource(data / "admin").client_context()
    with httpx.Client(base_url=url, verify=admin, timeout=10.0) as http:
        metrics = http.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    assert "mesh_registry_instances 0.0" in metrics.text
    # it signs with DIR/ca (renewal by SVID), and lets a caller without one reach the app
    key = ec.generate_private_key(ec.SECP256R1())
    admin_id = SpiffeID.parse(f"spiffe://{TD}/ns/meshlib-system/sa/meshctl")
    with RegistryClient(url, svid_dir=str(data / "admin")) as client:
        assert client.sign(make_csr(key, admin_id)).spiffe_id == str(admin_id)
    bundle = (data / "admin" / "bundle.pem").read_bytes()
    with RegistryClient.for_bootstrap(url, bundle_pem=bundle) as anonymous:
        with pytest.raises(RegistryRefused) as refused:
            anonymous.sign(make_csr(key, admin_id))
        assert refused.value.status == 401

    second = subprocess.run(
        [*SERVE, str(data)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert len(second.stderr.strip().splitlines()) == 1
    assert f"in use by process {process.pid}" in second.stderr

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0
    # the lock went with it: the data dir serves again, with the policy kept
    again = _serve(data)
    try:
        url = _first_line(again).split()[3]
        with RegistryClient(url, svid_dir=str(data / "admin")) as client:
            assert client.policy().version == 1
    finally:
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=20) == 0
        again.communicate(timeout=10)


def test_help_says_the_svids_must_be_renewed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "init", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    # argparse may wrap after a hyphen ("re- run"): look for words without one
    assert "The SVIDs last 24 h" in out and "issue 12" in out
    assert "run 'meshctl registry init --data DIR'" in out


# -- --store etcd --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--store", "etcd"], "--store etcd needs --etcd URL[,URL...]"),
        (
            ["--etcd", "http://127.0.0.1:2379"],
            "--etcd goes with --store etcd (the store is sqlite)",
        ),
        (["--store", "memory", "--etcd-prefix", "p/"], "--etcd-prefix goes with --store etcd"),
        (["--store", "etcd", "--etcd", "127.0.0.1:2379"], "'127.0.0.1:2379' is not an http(s)"),
        (["--store", "etcd", "--etcd", "http://a:1,ftp://b:2"], "'ftp://b:2' is not an http(s)"),
        (["--store", "etcd", "--etcd", "http://a"], "'http://a' must be http(s)://HOST:PORT"),
        (["--store", "etcd", "--etcd", " , "], "--etcd needs at least one URL"),
    ],
)
def test_serve_refuses_wrong_etcd_flags_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    # checked before the data dir is read: tmp_path has no registry at all
    assert main(["registry", "serve", "--data", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_serve_with_etcd_runs_stateless_debounced_replicas(tmp_path: Path) -> None:
    import argparse

    from meshlib.cli.registry import store_options

    def parsed(**flags: str) -> argparse.Namespace:
        return argparse.Namespace(**{"store": "sqlite", "etcd": None, "etcd_prefix": "", **flags})

    chosen = store_options(
        parsed(store="etcd", etcd="http://127.0.0.1:2379, https://10.0.0.2:2379", etcd_prefix="a/")
    )
    assert chosen == {
        "store": "etcd",
        "etcd": ["http://127.0.0.1:2379", "https://10.0.0.2:2379"],
        "prefix": "a/",
        "app": {"replicas": True, "debounce": (0.1, 1.0)},
    }
    assert store_options(parsed()) == {"store": "sqlite"}  # one process, no replica mode


def test_the_etcd_store_is_built_lazily_and_takes_no_data_dir_lock(tmp_path: Path) -> None:
    from meshlib.cli.registry import open_store
    from meshlib.control.etcd import EtcdStore

    chosen = {"store": "etcd", "etcd": ["http://127.0.0.1:1"], "prefix": "p/"}
    store = open_store(chosen, tmp_path)
    assert isinstance(store, EtcdStore)
    assert list(tmp_path.iterdir()) == []  # no registry.db, no registry.lock


@pytest.mark.timeout(90)
def test_two_etcd_replicas_serve_one_registry_from_one_data_dir(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    data = tmp_path / "reg"
    assert main(["registry", "init", "--data", str(data), "--trust-domain", TD]) == 0
    flags = ("--store", "etcd", "--etcd", ",".join(etcd.endpoints), "--etcd-prefix", "cli/")
    replicas = [_serve(data, *flags) for _ in range(2)]  # no lock: both start on one DIR
    try:
        urls = []
        for process in replicas:
            line = _first_line(process)
            assert line.startswith("registry serving on https://127.0.0.1:"), line
            urls.append(line.split()[3])
        admin = str(data / "admin")
        with (
            RegistryClient(urls[0], svid_dir=admin) as a,
            RegistryClient(urls[1], svid_dir=admin) as b,
        ):
            first = b.endpoints("default", "reviews")
            made = a.register("default", "reviews", "10.0.0.1", 9001)
            # B's held query hears of A's registration (its mirror, then the debounce window)
            seen = b.endpoints(
                "default", "reviews", index=first.index, wait=20.0, epoch=first.epoch
            )
            assert [e.id for e in seen.endpoints] == [made.id]
            assert seen.index == made.index
            status = b.status()
            assert status.store == f"etcd:{etcd.endpoints[0]}" and status.epoch == first.epoch
            assert status.replica is not None and status.replica.store_ok
            assert status.state == "warming"  # a replica warms after its start, as one does
        assert not (data / "registry.db").exists() and not (data / "registry.lock").exists()
    finally:
        for process in replicas:
            process.send_signal(signal.SIGTERM)
        for process in replicas:
            assert process.wait(timeout=20) == 0
            process.communicate(timeout=10)
