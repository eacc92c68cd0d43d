"""Checks the transcribed Gateway API mesh conformance cases against what a mesh answers.

The cases are data (``config/gateway_conformance.py``, transcribed from upstream's Go tests);
this module turns one into what a runner needs — the policy (:func:`policy_for`), the request
(:func:`request_for`) — and turns the answer into the list of ways it differs from what the
case expects (:func:`mismatches`; empty: the case passes). :func:`summarize` groups case
outcomes per upstream test (``MESH_TESTS``) for the docs' "which upstream tests pass" table.
The servers and the mesh belong to the runner, tests/e2e/test_gateway_conformance.py.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from config.gateway_conformance import (
    CASES,
    DATA_DIR,
    ECHO_V2_POD,
    MESH_NAMESPACE,
    MESH_TESTS,
    Case,
)

from meshlib.config.loader import load_texts
from meshlib.config.model import Snapshot

#: The upstream Services the base manifests declare, each served by its own echo backend.
#: Upstream's ``echo`` selects the echo-v1 and echo-v2 pods; here it has a backend of its own,
#: so a call that no route steered answers ``x-backend: echo`` and fails a case expecting
#: echo-v1 or echo-v2, instead of passing by chance half the time.
SERVICES = ("echo", "echo-v1", "echo-v2")
#: Upstream's mesh client is the echo-v1 app (in the case's namespace).
CLIENT = "echo-v1"
#: The echo pods' HTTP container port (manifests.yaml ``--port=8080``): a request to
#: ``{pod:echo-v2}:8080`` is a request to the echo-v2 backend's own address.
POD_PORT = 8080
#: Name of the generated file of Mesh and Service documents in the loaded policy.
SERVICES_SOURCE = "services.yaml"


def services_yaml(addresses: Mapping[str, str]) -> str:
    """A ``meshlib/v1`` Mesh document and one Service per upstream service, in the mesh
    namespace, each with its backend's ``host:port`` as its one endpoint."""
    missing = [name for name in SERVICES if name not in addresses]
    if missing:
        raise ValueError(f"no backend address for service(s) {missing}")
    docs = ["apiVersion: meshlib/v1\nkind: Mesh\nmetadata: {name: mesh}\n"]
    docs += [
        "apiVersion: meshlib/v1\nkind: Service\n"
        f"metadata: {{name: {name}, namespace: {MESH_NAMESPACE}}}\n"
        f"spec:\n  endpoints:\n    - address: {addresses[name]}\n"
        for name in SERVICES
    ]
    return "---\n".join(docs)


def policy_for(case: Case, addresses: Mapping[str, str], root: Path) -> Snapshot:
    """The case's policy: the generated services, then its vendored manifest (if any) read
    from ``root`` (the repository) as bytes, unchanged, under its repository path."""
    sources: list[tuple[str, str | bytes]] = [(SERVICES_SOURCE, services_yaml(addresses))]
    if case.manifest is not None:
        name = f"{DATA_DIR}/{case.manifest}"
        sources.append((name, (root / name).read_bytes()))
    return load_texts(sources)


@dataclass(frozen=True)
class Request:
    """What the runner sends for one case: method, URL, and headers in the case's order."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]


def request_for(case: Case, addresses: Mapping[str, str]) -> Request:
    """The case's request; ``{pod:echo-v2}:8080`` becomes the echo-v2 backend's address
    (upstream dials the pod directly, bypassing the Service)."""
    host = case.host
    if host.startswith(ECHO_V2_POD):
        port = host[len(ECHO_V2_POD) :]
        if port not in ("", f":{POD_PORT}"):
            raise ValueError(
                f"{case.test}: pod address {host!r}: the pods serve HTTP on {POD_PORT}"
            )
        host = addresses["echo-v2"]
    # httpx sends a "Host" given in headers instead of the URL's authority (only that header).
    return Request(case.method, f"http://{host}{case.path}", case.headers)


def _joined(value: str) -> str:
    """A header's values comma-joined without spaces (the echo joins repeats with ", ")."""
    return ",".join(part.strip() for part in value.split(","))


def _echo(response: httpx.Response) -> dict[str, Any] | None:
    """The echo backend's JSON body (what it saw), or None if no backend answered."""
    if "x-backend" not in response.headers:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def mismatches(case: Case, response: httpx.Response) -> list[str]:
    """Every way ``response`` differs from what ``case`` expects; empty when it passes."""
    out: list[str] = []
    if response.status_code != case.status:
        out.append(f"status {response.status_code}, expected {case.status}")
    answered = response.headers.get("x-backend")
    if case.backend is not None and answered != case.backend:
        out.append(f"answered by {answered!r}, expected {case.backend!r}")
    elif case.backend is None and 200 <= case.status < 300 and answered not in SERVICES:
        out.append(f"answered by {answered!r}, expected one of the backends {SERVICES}")
    if case.backend_path is not None or case.backend_headers or case.backend_absent:
        out += _backend_mismatches(case, _echo(response))
    for name, value in case.response_headers:
        got = response.headers.get_list(name)
        if _joined(",".join(got)) != _joined(value) or not got:
            out.append(f"response header {name}: {got}, expected {value!r}")
    out += [
        f"response header {name} present: {response.headers.get_list(name)}"
        for name in case.response_absent
        if name in response.headers
    ]
    if case.redirect is not None:
        out += _redirect_mismatches(case, response.headers.get("location"))
    return out


def _backend_mismatches(case: Case, seen: dict[str, Any] | None) -> list[str]:
    if seen is None:
        return ["no backend answered, so what it saw cannot be checked"]
    out: list[str] = []
    if case.backend_path is not None and seen.get("path") != case.backend_path:
        out.append(f"backend saw path {seen.get('path')!r}, expected {case.backend_path!r}")
    headers: dict[str, str] = seen.get("headers", {})
    for name, value in case.backend_headers:
        got = headers.get(name.lower())
        if got is None or _joined(got) != _joined(value):
            out.append(f"backend saw {name}: {got!r}, expected {value!r}")
    out += [
        f"backend saw {name}: {headers[name.lower()]!r}, expected it removed"
        for name in case.backend_absent
        if name.lower() in headers
    ]
    return out


def _redirect_mismatches(case: Case, location: str | None) -> list[str]:
    assert case.redirect is not None
    if location is None:
        return ["no Location header"]
    try:
        url = httpx.URL(location)
    except httpx.InvalidURL as exc:
        return [f"Location {location!r} is not a URL: {exc}"]
    # The port a client would use: the explicit one, else the scheme's default.
    port = url.port if url.port is not None else {"http": 80, "https": 443}.get(url.scheme)
    seen = {"scheme": url.scheme, "host": url.host, "port": str(port), "path": url.path}
    expected = vars(case.redirect)
    return [
        f"Location {location!r}: {part} {seen[part]!r}, expected {want!r}"
        for part, want in expected.items()
        if want is not None and seen[part] != want
    ]


def share_mismatches(answered: Iterable[str | None], weights: Mapping[str, float]) -> list[str]:
    """Each backend's count against its expected share, within a binomial 5-sigma bound
    (never flakes for a fair picker); an answer from outside ``weights`` is a mismatch."""
    counts = Counter(answered)
    n = sum(counts.values())
    out = [
        f"{count} answer(s) from {name!r}" for name, count in counts.items() if name not in weights
    ]
    for name, p in weights.items():
        bound = 5 * math.sqrt(n * p * (1 - p))
        if abs(counts[name] - n * p) > bound:
            out.append(f"{name}: {counts[name]} of {n}, expected {n * p:.0f} ± {bound:.0f}")
    return out


def case_ids() -> list[str]:
    """One id per case of CASES, in order: the upstream test name and the case's index in it."""
    seen: Counter[str] = Counter()
    ids = []
    for case in CASES:
        ids.append(f"{case.test}-{seen[case.test]}")
        seen[case.test] += 1
    return ids


def summarize(outcomes: Iterable[tuple[str, bool]]) -> dict[str, str]:
    """Group (case id from :func:`case_ids`, passed) pairs per upstream test, in MESH_TESTS
    order: ``pass`` (every case of the test ran and none failed), ``fail`` (a case failed),
    ``partial`` (none failed, some did not run), ``not run``, or ``not transcribed`` (the test
    has no cases: gRPC). A case may be reported more than once (sync and async clients)."""
    ids = case_ids()
    cases_of: dict[str, set[str]] = {test: set() for test in MESH_TESTS}
    for case_id, case in zip(ids, CASES, strict=True):
        cases_of[case.test].add(case_id)
    known = set(ids)
    passed: set[str] = set()
    failed: set[str] = set()
    for case_id, ok in outcomes:
        if case_id not in known:
            raise ValueError(f"{case_id!r} is not a transcribed case id (see case_ids())")
        (passed if ok else failed).add(case_id)
    verdicts = {}
    for test, cases in cases_of.items():
        if not cases:
            verdicts[test] = "not transcribed"
        elif cases & failed:
            verdicts[test] = "fail"
        elif cases <= passed:
            verdicts[test] = "pass"
        else:
            verdicts[test] = "partial" if cases & passed else "not run"
    return verdicts
