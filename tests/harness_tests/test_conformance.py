"""Checks the conformance runner's checker without sockets: it accepts the answer a conforming
mesh gives for every transcribed case, and names each way a wrong answer differs.

The "conforming answer" of a case is built the way the echo backend and the mesh would send
it (lower-case header names, repeats joined with ", ", an absolute Location), so these tests
pin the normalisation the runner relies on, for all cases, before routing exists to run them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import pytest
from config.gateway_conformance import (
    CASES,
    CONSUMER_NAMESPACE,
    DATA_DIR,
    ECHO_V2_POD,
    MESH_NAMESPACE,
    MESH_TESTS,
    WEIGHTS,
    Case,
    Redirect,
)
from harness.conformance import (
    SERVICES,
    SERVICES_SOURCE,
    case_ids,
    mismatches,
    policy_for,
    request_for,
    services_yaml,
    share_mismatches,
    summarize,
)

from meshlib.config.loader import load_text
from meshlib.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ADDRESSES = {"echo": "127.0.0.1:9001", "echo-v1": "127.0.0.1:9002", "echo-v2": "127.0.0.1:9003"}
IDS = case_ids()


def conforming(case: Case) -> httpx.Response:
    """The answer a conforming mesh gives ``case``, shaped as the echo backend shapes it."""
    headers: list[tuple[str, str]] = [(n.lower(), v) for n, v in case.response_headers]
    if case.redirect is not None:
        r = case.redirect
        port = f":{r.port}" if r.port is not None else ""
        headers.append(
            ("location", f"{r.scheme or 'http'}://{r.host or 'echo'}{port}{r.path or case.path}")
        )
        return httpx.Response(case.status, headers=headers)
    if not 200 <= case.status < 300:
        return httpx.Response(case.status, headers=[("x-mesh-reason", "no_route")])
    seen = {n.lower(): v.replace(",", ", ") for n, v in case.headers}  # echo joins with ", "
    seen.update({n.lower(): v.replace(",", ", ") for n, v in case.backend_headers})
    for name in case.backend_absent:
        seen.pop(name.lower(), None)
    backend = case.backend or "echo-v1"
    body = {"backend": backend, "path": case.backend_path or case.path.split("?")[0]}
    body["headers"] = seen  # type: ignore[assignment]
    headers.append(("x-backend", backend))
    return httpx.Response(case.status, headers=headers, content=json.dumps(body).encode())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_conforming_answer_passes(case: Case) -> None:
    assert mismatches(case, conforming(case)) == []


def test_a_wrong_status_and_backend_are_named() -> None:
    case = Case("T", None, status=200, backend="echo-v1")
    assert mismatches(case, httpx.Response(404)) == [
        "status 404, expected 200",
        "answered by None, expected 'echo-v1'",
    ]
    any_backend = Case("T", None)
    assert mismatches(any_backend, httpx.Response(200, headers={"x-backend": "echo"})) == []
    assert mismatches(any_backend, httpx.Response(200)) == [
        f"answered by None, expected one of the backends {SERVICES}"
    ]


def test_what_the_backend_saw_is_checked() -> None:
    case = Case(
        "T",
        None,
        backend="echo-v1",
        backend_path="/one",
        backend_headers=(("X-Add", "a,b"),),
        backend_absent=("X-Gone",),
    )
    body = {"path": "/prefix/one", "headers": {"x-add": "a", "x-gone": "1"}}
    response = httpx.Response(200, headers={"x-backend": "echo-v1"}, content=json.dumps(body))
    assert mismatches(case, response) == [
        "backend saw path '/prefix/one', expected '/one'",
        "backend saw X-Add: 'a', expected 'a,b'",
        "backend saw X-Gone: '1', expected it removed",
    ]
    assert mismatches(case, httpx.Response(200, headers={"x-backend": "echo-v1"})) == [
        "no backend answered, so what it saw cannot be checked"
    ]


def test_response_headers_are_checked_case_insensitively() -> None:
    case = Case("T", None, response_headers=(("X-Header-Set", "v1"),), response_absent=("X-A",))
    good = httpx.Response(200, headers={"x-backend": "echo", "x-header-set": "v1"})
    assert mismatches(case, good) == []
    bad = httpx.Response(200, headers={"x-backend": "echo", "X-A": "1"})
    assert mismatches(case, bad) == [
        "response header X-Header-Set: [], expected 'v1'",
        "response header X-A present: ['1']",
    ]


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("https://example.org:8083/x", []),
        ("http://example.org/x", ["scheme 'http', expected 'https'", "port '80', expected '8083'"]),
        ("https://echo:8083/x", ["host 'echo', expected 'example.org'"]),
        (None, ["no Location header"]),
    ],
)
def test_the_redirect_location_parts_are_checked(location: str | None, expected: list[str]) -> None:
    case = Case("T", None, status=302, redirect=Redirect("https", "example.org", "8083", "/x"))
    headers = {"location": location} if location is not None else {}
    found = mismatches(case, httpx.Response(302, headers=headers))
    assert [f.split(": ", 1)[-1] for f in found] == expected


def test_the_generated_services_load_with_their_endpoints() -> None:
    snapshot = load_text(services_yaml(ADDRESSES), source=SERVICES_SOURCE)
    for name, address in ADDRESSES.items():
        service = snapshot.services[f"{name}.{MESH_NAMESPACE}"]
        assert [e.address for e in service.endpoints] == [address]
    with pytest.raises(ValueError, match="echo-v2"):
        services_yaml({"echo": "127.0.0.1:1", "echo-v1": "127.0.0.1:2"})


def test_the_policy_is_the_services_then_the_manifest_file_as_it_is(tmp_path: Path) -> None:
    basic = next(c for c in CASES if c.manifest is None)
    assert set(policy_for(basic, ADDRESSES, ROOT).services) == {
        f"{name}.{MESH_NAMESPACE}" for name in SERVICES
    }
    # A manifest under another root, read from there and named by its repository path.
    case = next(c for c in CASES if c.manifest is not None)
    name = f"{DATA_DIR}/{case.manifest}"
    (tmp_path / name).parent.mkdir(parents=True)
    (tmp_path / name).write_bytes(b"apiVersion: meshlib/v1\nkind: Nope\n")
    with pytest.raises(ConfigError, match=f"{name}:2:7 .*unknown kind 'Nope'"):
        policy_for(case, ADDRESSES, tmp_path)


def test_the_request_dials_the_case_host_and_keeps_its_headers() -> None:
    frontend = [c for c in CASES if c.test.startswith("MeshFrontend")]
    by_host = {c.host: request_for(c, ADDRESSES) for c in frontend}
    assert by_host[ECHO_V2_POD + ":8080"].url == f"http://{ADDRESSES['echo-v2']}/"
    assert by_host["echo-v2"].url == "http://echo-v2/"
    hostname = next(c for c in frontend if c.headers)
    assert request_for(hostname, ADDRESSES).headers == (("Host", "echo-v1"),)
    query = next(c for c in CASES if "?" in c.path)
    assert request_for(query, ADDRESSES).url == f"http://echo{query.path}"
    with pytest.raises(ValueError, match="pods serve HTTP on 8080"):
        request_for(Case("T", None, host=ECHO_V2_POD + ":80"), ADDRESSES)
    consumer = next(c for c in CASES if c.client_namespace == CONSUMER_NAMESPACE)
    assert request_for(consumer, ADDRESSES).url == "http://echo-v1.gateway-conformance-mesh/"


def test_the_share_bound_is_five_sigma_and_counts_strangers() -> None:
    weights = WEIGHTS["MeshHTTPRouteWeight"]  # 70/30: sigma over 1000 is 14.5, bound 72
    assert share_mismatches(["echo-v1"] * 772 + ["echo-v2"] * 228, weights) == []
    assert share_mismatches(["echo-v1"] * 775 + ["echo-v2"] * 225, weights) == [
        "echo-v1: 775 of 1000, expected 700 ± 72",
        "echo-v2: 225 of 1000, expected 300 ± 72",
    ]
    rng = random.Random(14)
    fair = rng.choices(["echo-v1", "echo-v2"], [0.7, 0.3], k=1000)
    assert share_mismatches(fair, weights) == []
    assert share_mismatches([*fair[:-1], None], weights) == ["1 answer(s) from None"]


def test_case_ids_are_unique_and_name_their_upstream_test() -> None:
    assert len(set(IDS)) == len(CASES)
    assert IDS[0] == "MeshBasic-0"
    assert all(i.rsplit("-", 1)[0] == c.test for i, c in zip(IDS, CASES, strict=True))


def test_the_summary_groups_outcomes_per_upstream_test() -> None:
    matching = [i for i in IDS if i.startswith("MeshHTTPRouteMatching-")]
    split = [i for i in IDS if i.startswith("MeshTrafficSplit-")]
    outcomes = [("MeshBasic-0", True), ("MeshBasic-0", True)]  # sync and async
    outcomes += [(i, True) for i in matching]
    outcomes += [(matching[0], False)]  # its async run failed
    outcomes += [(split[0], True)]
    summary = summarize(outcomes)
    assert list(summary) == list(MESH_TESTS)
    assert summary["MeshBasic"] == "pass"
    assert summary["MeshHTTPRouteMatching"] == "fail"
    assert summary["MeshTrafficSplit"] == "partial"
    assert summary["MeshPorts"] == "not run"
    assert summary["MeshGRPCRouteWeight"] == "not transcribed"
    with pytest.raises(ValueError, match="'MeshNope-0' is not a transcribed case id"):
        summarize([("MeshNope-0", True)])
