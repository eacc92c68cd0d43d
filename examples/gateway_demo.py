"""The ingress gateway in front of Bookinfo-style services: an outside client with no mesh
identity gets in over HTTPS through ``meshctl gateway serve``, and only that way.

    python examples/gateway_demo.py [--burst 50] [--data DIR]

Every part is its own process on 127.0.0.1, as on separate hosts:

* the registry: ``meshctl registry init`` and ``meshctl registry serve`` (as in
  ``registry_demo.py``, whose helpers this script imports), holding the policy applied with
  ``meshctl apply``: strict mTLS; ``productpage`` admits only the gateway's SPIFFE ID and the
  reviews services only productpage's (AuthorizationPolicy); an HTTPRoute splits ``reviews``
  50/50 over reviews-v1 and reviews-v2;
* three workloads, ``examples/registry_workload.py`` each: productpage, reviews-v1, reviews-v2;
* the gateway: ``meshctl gateway serve`` with its mesh from the environment (the registry, the
  Service ``gateway`` in namespace ``edge``, an SVID from ``meshctl ca issue``) and its own
  ``gateway.yaml``: an HTTP listener whose route redirects to HTTPS, an HTTPS listener for
  ``bookinfo.example`` whose certificate (a throwaway CA and leaf, made here with
  ``cryptography``) sits in a ``kubernetes.io/tls`` Secret, and routes ``/productpage`` to
  productpage and ``/reviews`` to reviews.

This script is the outside client: plain httpx, trusting the throwaway CA only, sending SNI and
Host ``bookinfo.example``. It prints the HTTP → HTTPS redirect, the page through HTTPS (which
reviews backend answered, and the identity each hop saw), a forged ``x-mesh-identity`` that
never reaches the service, ``/reviews`` refused by the reviews services' policy, an unknown
SNI name and a direct call to productpage without a client certificate refused, and the
latency of a burst through the gateway. Every process is stopped at the end, also on Ctrl-C
or a failure.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import shlex
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from registry_demo import (
    TRUST_DOMAIN,
    WORKLOAD,
    Process,
    Processes,
    mesh_env,
    meshctl,
    q,
    start_registry,
)

from meshlib.control.client import RegistryClient

HOST = "bookinfo.example"
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/ns/edge/sa/gateway"
#: httpcore sends this name in the TLS handshake instead of the URL's host (127.0.0.1).
SNI = {"sni_hostname": HOST}

POLICY = f"""\
apiVersion: meshlib/v1
kind: Mesh
metadata: {{name: bookinfo}}
spec: {{trustDomain: {TRUST_DOMAIN}, mtls: strict}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: gateway, namespace: edge}}   # the gateway calls; nothing calls it in the mesh
spec: {{serviceAccount: gateway}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: productpage}}
spec: {{serviceAccount: productpage}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews}}
spec: {{serviceAccount: reviews}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews-v1}}
spec: {{serviceAccount: reviews}}
---
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews-v2}}
spec: {{serviceAccount: reviews}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: reviews-split}}
spec:
  parentRefs: [{{group: "", kind: Service, name: reviews}}]
  rules:
  - backendRefs:   # port: the spec requires it; registered instances carry their own
    - {{name: reviews-v1, port: 9080, weight: 50}}
    - {{name: reviews-v2, port: 9080, weight: 50}}
---
apiVersion: meshlib/v1
kind: AuthorizationPolicy
metadata: {{name: productpage-from-gateway}}
spec:
  target: {{service: productpage}}
  rules:
  - from: [{{principals: ["{TRUST_DOMAIN}/ns/edge/sa/gateway"]}}]
""" + "".join(
    f"""---
apiVersion: meshlib/v1
kind: AuthorizationPolicy
metadata: {{name: {service}-from-productpage}}
spec:
  target: {{service: {service}}}
  rules:
  - from: [{{principals: ["{TRUST_DOMAIN}/ns/default/sa/productpage"]}}]
"""
    for service in ("reviews-v1", "reviews-v2")
)

GATEWAY = f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: bookinfo, namespace: edge}}
spec:
  gatewayClassName: meshlib
  listeners:
  - {{name: http, port: 80, protocol: HTTP}}
  - name: https
    hostname: {HOST}
    port: 443
    protocol: HTTPS
    tls: {{certificateRefs: [{{name: bookinfo-cert}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: to-https, namespace: edge}}
spec:
  parentRefs: [{{name: bookinfo, sectionName: http}}]
  rules:
  - filters:
    - type: RequestRedirect
      requestRedirect: {{scheme: https, statusCode: 301}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: bookinfo, namespace: edge}}
spec:
  parentRefs: [{{name: bookinfo, sectionName: https}}]
  hostnames: [{HOST}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /productpage}}}}]
    backendRefs: [{{name: productpage, namespace: default, port: 9080}}]
  - matches: [{{path: {{type: PathPrefix, value: /reviews}}}}]
    backendRefs: [{{name: reviews, namespace: default, port: 9080}}]
"""


@dataclass(frozen=True)
class EdgeCertificates:
    """A throwaway CA and its leaf for ``HOST``, as PEM: what a public CA would sell."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def edge_certificates() -> EdgeCertificates:
    now = dt.datetime.now(dt.timezone.utc)
    valid = (now - dt.timedelta(minutes=5), now + dt.timedelta(hours=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway demo CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return EdgeCertificates(
        ca.public_bytes(serialization.Encoding.PEM),
        leaf.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def gateway_config(certs: EdgeCertificates) -> str:
    crt = base64.b64encode(certs.cert_pem).decode()
    key = base64.b64encode(certs.key_pem).decode()
    secret = (
        "apiVersion: v1\nkind: Secret\nmetadata: {name: bookinfo-cert, namespace: edge}\n"
        f"type: kubernetes.io/tls\ndata:\n  tls.crt: {crt}\n  tls.key: {key}\n"
    )
    return GATEWAY + "---\n" + secret


def registered(registry: RegistryClient, services: set[str], timeout: float = 30) -> None:
    """Wait until each of ``services`` has an instance in the registry: a process started after
    that finds it in its start-up fetch, so its first call has somewhere to go."""
    deadline = time.monotonic() + timeout
    while services - {i.service for i in registry.instances()}:
        if time.monotonic() > deadline:
            raise RuntimeError(f"not all of {sorted(services)} registered within {timeout:.0f} s")
        time.sleep(0.05)


def listening(gateway: Process, port: int) -> int:
    """The port ``meshctl gateway serve`` bound for the Gateway's listener port ``port``
    (it prints ``listening: PORT -> URL`` once every port listens, in port order)."""
    line = gateway.wait_for(f"listening: {port} -> ", 30)
    print(f"  {line}")
    return int(line.rsplit(":", 1)[1])


def outside_get(
    client: httpx.Client, url: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """A GET to ``url`` (at the gateway's address) as if to https://bookinfo.example: the Host
    header and, on TLS, the SNI name (which the certificate is checked against) are HOST."""
    return client.get(url, headers={"host": HOST, **(headers or {})}, extensions=SNI)


def run(data: Path, burst: int) -> None:
    procs = Processes(data)
    cli = [sys.executable, "-m", "meshlib.cli"]
    registry: RegistryClient | None = None
    try:
        print("== 1. a registry, an SVID per workload and one for the gateway ==")
        accounts = [("default", "productpage"), ("default", "reviews"), ("edge", "gateway")]
        url, admin, svids = start_registry(procs, data, accounts, show="gateway")
        registry = RegistryClient(url, svid_dir=admin["MESHLIB_SVID_DIR"])
        (data / "mesh.yaml").write_text(POLICY)
        meshctl(f"apply -f {q(data / 'mesh.yaml')}", env=admin)

        print("\n== 2. the workloads: reviews-v1, reviews-v2, then productpage ==")

        def launch(service: str, account: str) -> None:
            env = mesh_env(url, service, svids[account], data / "cache" / service)
            started = procs.start(service, [sys.executable, str(WORKLOAD), "--seed", "11"], env)
            line = started.wait_for("serving ", 60)  # "serving SERVICE on https://HOST:PORT"
            print(f"  {line} (pid {started.popen.pid})")
            addresses[service] = line.rsplit(" ", 1)[1]

        addresses: dict[str, str] = {}
        launch("reviews-v1", "reviews")
        launch("reviews-v2", "reviews")
        registered(registry, {"reviews-v1", "reviews-v2"})
        launch("productpage", "productpage")
        registered(registry, {"productpage"})

        print("\n== 3. the gateway: a certificate for bookinfo.example, gateway.yaml, serve ==")
        certs = edge_certificates()
        config = data / "gateway.yaml"
        config.write_text(gateway_config(certs))
        meshctl(f"gateway validate --config {q(config)}", env={})
        serve = f"gateway serve --config {q(config)} --port http=0 --port https=0"
        gateway = procs.start(
            "gateway",
            [*cli, *shlex.split(serve)],
            {
                **mesh_env(url, "gateway", svids["gateway"], data / "cache" / "gateway"),
                "MESHLIB_NAMESPACE": "edge",
            },
        )
        print(f"$ meshctl {serve}  (pid {gateway.popen.pid})")
        http_port, https_port = listening(gateway, 80), listening(gateway, 443)

        print("\n== 4. an outside client: no mesh identity, trusts only the demo CA ==")
        https = f"https://127.0.0.1:{https_port}"
        with (
            httpx.Client(timeout=10.0) as plain,
            httpx.Client(verify=trusting(certs), timeout=10.0) as client,
        ):
            answer = outside_get(plain, f"http://127.0.0.1:{http_port}/productpage")
            print(
                f"  GET http://{HOST}/productpage → {answer.status_code}, "
                f"Location: {answer.headers.get('location')}"
            )
            print(f"  (the demo resolves {HOST} to the gateway's HTTPS listener, {https})")
            with client.stream(
                "GET", f"{https}/productpage", headers={"host": HOST}, extensions=SNI
            ) as streamed:
                stream = streamed.extensions["network_stream"]
                peer = stream.get_extra_info("ssl_object").getpeercert()
                streamed.read()
            page = streamed.json()
            subject = dict(item for rdn in peer["subject"] for item in rdn)["commonName"]
            issuer = dict(item for rdn in peer["issuer"] for item in rdn)["commonName"]
            print(
                f"  GET https://{HOST}/productpage → {streamed.status_code} "
                f"(certificate {subject}, issued by {issuer})"
            )
            print(f"    productpage saw caller {page['caller']}")
            reviews = page["reviews"]
            print(
                f"    reviews answered by {reviews['service']} at {reviews['instance']}, "
                f"which saw caller {reviews['caller']}"
            )

            forged = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/productpage"
            answer = outside_get(client, f"{https}/productpage", {"x-mesh-identity": forged})
            seen = answer.json()["caller"]
            verdict = "the forged header never reached it" if seen == GATEWAY_ID else "FORGED"
            print(
                f"  forged x-mesh-identity: {forged} → {answer.status_code}; productpage saw "
                f"{seen} ({verdict})"
            )

            answer = outside_get(client, f"{https}/reviews")
            print(
                f"  GET https://{HOST}/reviews → {answer.status_code} "
                f"(x-mesh-reason: {answer.headers.get('x-mesh-reason')}): the reviews services "
                "admit only productpage"
            )

            print(f"  SNI other.example: {handshake(certs, https_port, 'other.example')}")

            direct = addresses["productpage"]
            try:
                with httpx.Client(verify=False, timeout=5.0) as bare:
                    answer = bare.get(f"{direct}/productpage")
                print(f"  direct to productpage {direct}: ANSWERED {answer.status_code}")
            except httpx.TransportError as exc:
                print(
                    f"  direct to productpage {direct} without a client certificate: refused "
                    f"({type(exc).__name__})"
                )

            times: list[float] = []
            backends: Counter[str] = Counter()
            statuses: Counter[int] = Counter()
            for _ in range(burst):
                sent = time.perf_counter()
                answer = outside_get(client, f"{https}/productpage")
                times.append((time.perf_counter() - sent) * 1000)
                statuses[answer.status_code] += 1
                if answer.status_code == 200:
                    backends[answer.json()["reviews"]["service"]] += 1
            ok = statuses[200]
            split = ", ".join(f"{name} {n}" for name, n in sorted(backends.items()))
            print(
                f"  a burst of {burst} sequential requests through the gateway: {ok} answered "
                f"200, p50 {statistics.median(times):.1f} ms, max {max(times):.1f} ms "
                f"(gateway → productpage → reviews, two mTLS hops; {split})"
            )
    finally:
        if registry is not None:
            registry.close()
        procs.stop_all()


def handshake(certs: EdgeCertificates, port: int, name: str) -> str:
    """A fresh TLS handshake asking for ``name``: the certificate served, or the refusal. The
    chain is checked but not the name, so a refusal is the gateway's (no listener serves that
    name), not this client's hostname check."""
    context = trusting(certs)
    context.check_hostname = False
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            served = tls.getpeercert()
    except (ssl.SSLError, ConnectionError) as exc:
        # asyncio's TLS closes without flushing the unrecognized_name alert: an EOF, often
        return f"refused in the handshake ({getattr(exc, 'reason', None) or type(exc).__name__})"
    return f"ANSWERED with {served.get('subject') if served else None}"


def trusting(certs: EdgeCertificates) -> ssl.SSLContext:
    """The outside client's TLS: the demo CA is its only trust anchor."""
    return ssl.create_default_context(cadata=certs.ca_pem.decode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--burst", type=int, default=50, help="requests in the latency burst")
    parser.add_argument("--data", type=Path, help="keep the demo's files here (default: temp)")
    args = parser.parse_args()
    if args.burst < 1:
        parser.error("--burst must be at least 1")
    if args.data is not None:
        args.data.mkdir(parents=True, exist_ok=True)
        run(args.data, args.burst)
        return
    with tempfile.TemporaryDirectory(prefix="meshlib-gateway-demo-") as tmp:
        run(Path(tmp), args.burst)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: every process was stopped", file=sys.stderr)
        sys.exit(130)
