"""The inbound hot path's shortcuts change nothing a peer or the app can observe.

The middleware skips work that cannot apply (benchmarks/inbound_loop.py measures it): the
server's scope goes to the app uncopied when nothing in it changes, header sanitation trusts
memoised per-name verdicts, authorization is not evaluated where none is in force, and the plan
of a snapshot is derived once. Each test pins one shortcut against the slow path's answer.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

import pytest
from policy.authz.authzdocs import ROUTES, SERVICES, TARGET_V1, load, mesh, target_spec

import meshlib
from inbound.conftest import SERVICE_ONLY, http_scope
from inbound.test_middleware import Recorder, call
from meshlib.config.loader import load_text
from meshlib.inbound import IDENTITY_HEADER, passes_unchanged, sanitize_headers
from meshlib.policy.authz import AuthzIndex, normalize_path

CLEAN = [(b"host", b"svc"), (b"user-agent", b"wrk"), (b"accept", b"*/*")]


def test_an_unchanged_scope_is_handed_over_uncopied(make_mesh: Callable[..., meshlib.Mesh]) -> None:
    app = Recorder()
    middleware = meshlib.MeshMiddleware(app, mesh=make_mesh())
    headers = [*CLEAN, (f"x-unseen-{uuid.uuid4().hex}".encode(), b"v")]
    first, second = http_scope(list(headers)), http_scope(list(headers))
    call(middleware, first)  # an unseen header name: sanitized (a copy), verdicts memoised
    call(middleware, second)
    assert app.scopes[0] is not first and app.scopes[0]["headers"] == headers
    assert app.scopes[1] is second and second["headers"] == headers


@pytest.mark.parametrize(
    "forged",
    [
        (IDENTITY_HEADER.encode(), b"spiffe://shop.test/ns/default/sa/admin"),
        (b"X-Mesh-Identity", b"spiffe://shop.test/ns/default/sa/admin"),
        (b"x_mesh_timeout_ms", b"1"),
        (b"x-mesh-timeout-ms", b"1"),
        (b"x-forwarded-client-cert", b"By=spiffe://shop.test/ns/default/sa/admin"),
    ],
)
def test_a_forged_header_after_clean_requests_is_still_stripped(
    make_mesh: Callable[..., meshlib.Mesh], forged: tuple[bytes, bytes]
) -> None:
    app = Recorder()
    middleware = meshlib.MeshMiddleware(app, mesh=make_mesh())
    for _ in range(3):
        call(middleware, http_scope(list(CLEAN)))
    scope = http_scope([*CLEAN, forged])
    call(middleware, scope)
    assert app.scopes[-1] is not scope and app.scopes[-1]["headers"] == CLEAN
    assert scope["headers"] == [*CLEAN, forged]  # the server's scope is as it was
    call(middleware, scope)  # the name is memoised now: still stripped
    assert app.scopes[-1]["headers"] == CLEAN


def test_passes_unchanged_answers_from_memoised_verdicts_only() -> None:
    names = [(f"x-unseen-{uuid.uuid4().hex}".encode(), b"v")]
    assert not passes_unchanged(names)  # never seen: the caller must sanitize
    assert sanitize_headers(names, None) == names
    assert passes_unchanged(names)
    assert passes_unchanged([])
    for dropped in (b"x-mesh-identity", b"x-mesh-timeout-ms", b"l5d-client-id"):
        sanitize_headers([(dropped, b"v")], None)  # memoised as dropped or member-only
        assert not passes_unchanged([*names, (dropped, b"v")])


def test_a_reload_takes_effect_at_the_next_request(
    make_mesh: Callable[..., meshlib.Mesh],
) -> None:
    """The plan is derived once per snapshot: a reload swaps it at the next request."""
    open_text = SERVICE_ONLY
    enforce = open_text.replace("shop.test}", "shop.test, accessControl: enforce}")
    assert enforce != open_text
    app = Recorder()
    the_mesh = make_mesh(open_text)
    middleware = meshlib.MeshMiddleware(app, mesh=the_mesh)
    assert call(middleware, http_scope(path="/a//b"))[0]["status"] == 200
    assert app.scopes[-1]["path"] == "/a//b"  # nothing in force: the path is untouched
    the_mesh.apply(load_text(enforce, version=the_mesh.snapshot.version + 1))
    assert call(middleware, http_scope(path="/a//b"))[0]["status"] == 403
    the_mesh.apply(load_text(open_text, version=the_mesh.snapshot.version + 1))
    assert call(middleware, http_scope(path="/a//b"))[0]["status"] == 200


#: Path pieces that exercise every branch of normalisation, plain and encoded.
_PIECES = ["a", "B", "/", "/", ".", "..", "%2f", "%2F", "%2e", "%5c", "%00", "%41", "~", "\\"]


def test_normalize_path_fast_path_agrees_with_the_full_algorithm() -> None:
    rng = random.Random(11)
    for _ in range(5000):
        path = "/" + "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 8)))
        normal = normalize_path(path)
        if normal is None:
            continue
        assert normalize_path(normal) == normal, path  # a normal path is its own normal form
        assert "//" not in normal and "/./" not in normal and "/../" not in normal, path
        assert not normal.endswith(("/.", "/..")), path
    for clean in ("/", "/a", "/a/", "/a.b/c-d", "/items/1", "/A/b"):
        assert normalize_path(clean) == clean
    assert normalize_path("/.well-known/x") == "/.well-known/x"  # "/." takes the full path
    assert normalize_path("/a/./b/../c/") == "/a/c/"


def test_reads_headers_only_when_a_route_group_match_has_headers() -> None:
    def index(*targets: str) -> AuthzIndex:
        snapshot = load(mesh(), SERVICES, ROUTES, *targets)
        return AuthzIndex.build(snapshot, snapshot.services["reviews.default"])

    assert not index().in_force and not index().reads_headers
    assert index(TARGET_V1).in_force and not index(TARGET_V1).reads_headers
    beta = index(target_spec(3, matches="[beta]"))
    assert beta.in_force and beta.reads_headers
