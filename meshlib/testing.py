"""pytest plugin (entry point ``pytest11``): fault injection into mesh calls for one test, and
retries without backoff waits.

A test asks for the ``mesh_faults`` fixture and says what should go wrong; the faults apply
to calls made through the mesh for the duration of that test only, then vanish::

    def test_ratings_outage(mesh, mesh_faults):
        mesh_faults.abort("ratings", status=503, percent=50)
        mesh_faults.delay("reviews", 2.0, headers={"end-user": "jason"})
        mesh_faults.refuse("details")
        ...

The mesh is the test's own ``mesh`` fixture when it has one (another name with the ini option
``meshlib_mesh_fixture = my_mesh``), or any mesh passed explicitly
(``mesh_faults.abort("ratings", status=503, mesh=other_mesh)``).

``instant_retries(mesh)`` (a context manager) and the ``mesh_instant_retries`` fixture make a
mesh's retries wait no backoff: the same attempts, no sleeps between them.

Nothing here is global: faults and the instant switch live on the mesh object and are undone at
teardown. See docs/testing.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import pytest

from meshlib.mesh import FaultHandle, Mesh

__all__ = [
    "MESH_FIXTURE_OPTION",
    "FaultInjector",
    "instant_retries",
    "mesh_faults",
    "mesh_instant_retries",
]

#: The ini option naming the project's mesh fixture (``meshlib_mesh_fixture = my_mesh``).
MESH_FIXTURE_OPTION = "meshlib_mesh_fixture"


class FaultInjector:
    """Adds run-time faults to meshes and removes them all on :meth:`clear`."""

    def __init__(
        self,
        default_mesh: Mesh | None = None,
        *,
        find_mesh: Callable[[], Mesh] | None = None,
    ) -> None:
        self._default = default_mesh
        self._find_mesh = find_mesh  # looked up on first use when there is no default
        self._handles: list[FaultHandle] = []

    def _mesh(self, mesh: Mesh | None) -> Mesh:
        if mesh is not None:
            return mesh
        if self._default is None:
            if self._find_mesh is None:
                raise LookupError("mesh_faults needs a mesh: pass mesh=... explicitly")
            self._default = self._find_mesh()
        return self._default

    def abort(
        self,
        service: str,
        *,
        status: int = 503,
        percent: float = 100.0,
        headers: Mapping[str, str] | None = None,
        route: str | None = None,
        mesh: Mesh | None = None,
    ) -> FaultHandle:
        """Answer ``status`` (with ``x-mesh-reason: fault_abort``) instead of calling."""
        if not 100 <= status <= 599:
            raise ValueError(f"abort status must be 100..599, got {status}")
        return self._add(
            self._mesh(mesh).inject_fault(
                service, abort=status, percent=percent, headers=headers, route=route
            )
        )

    def delay(
        self,
        service: str,
        seconds: float,
        *,
        percent: float = 100.0,
        headers: Mapping[str, str] | None = None,
        route: str | None = None,
        mesh: Mesh | None = None,
    ) -> FaultHandle:
        """Hold calls for ``seconds`` before they leave (counts against the call's deadline)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0 seconds")
        return self._add(
            self._mesh(mesh).inject_fault(
                service, delay=seconds, percent=percent, headers=headers, route=route
            )
        )

    def refuse(
        self,
        service: str,
        *,
        percent: float = 100.0,
        headers: Mapping[str, str] | None = None,
        route: str | None = None,
        mesh: Mesh | None = None,
    ) -> FaultHandle:
        """Fail attempts as if every endpoint refused the connection (retried like one)."""
        return self._add(
            self._mesh(mesh).inject_fault(
                service, refuse=True, percent=percent, headers=headers, route=route
            )
        )

    def _add(self, handle: FaultHandle) -> FaultHandle:
        self._handles.append(handle)
        return handle

    def clear(self) -> None:
        """Remove every fault this injector added."""
        while self._handles:
            self._handles.pop().remove()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        MESH_FIXTURE_OPTION,
        help="name of the fixture that gives the test's meshlib.Mesh (mesh_faults, "
        "mesh_instant_retries use it); default: mesh",
        default="mesh",
    )


def _mesh_fixture_name(request: pytest.FixtureRequest) -> str:
    return str(request.config.getini(MESH_FIXTURE_OPTION)) or "mesh"


def _find_mesh(request: pytest.FixtureRequest) -> Callable[[], Mesh]:
    """A lookup of the project's mesh fixture (``meshlib_mesh_fixture``, default ``mesh``),
    raising a LookupError that says how to name another fixture."""
    name = _mesh_fixture_name(request)

    def find() -> Mesh:
        # A fixture the test did not request itself is still found, on first use.
        try:
            candidate = request.getfixturevalue(name)
        except pytest.FixtureLookupError:
            raise LookupError(
                f"no fixture named {name!r} gives a mesh: define it, set "
                f"`{MESH_FIXTURE_OPTION} = <your fixture>` in the [pytest] ini options, "
                "or pass mesh=... explicitly"
            ) from None
        if not isinstance(candidate, Mesh):
            raise LookupError(
                f"fixture {name!r} gives {type(candidate).__name__}, not a meshlib.Mesh: "
                f"set `{MESH_FIXTURE_OPTION} = <your fixture>` in the [pytest] ini options, "
                "or pass mesh=... explicitly"
            )
        return candidate

    return find


def _requested_mesh(request: pytest.FixtureRequest) -> Mesh | None:
    """The mesh fixture's value when the test requests it (set up before, torn down after this
    plugin's fixtures); a fixture of that name that is not a Mesh is reported on first use."""
    name = _mesh_fixture_name(request)
    if name not in request.fixturenames:
        return None
    candidate = request.getfixturevalue(name)
    return candidate if isinstance(candidate, Mesh) else None


@contextmanager
def instant_retries(mesh: Mesh) -> Iterator[Mesh]:
    """Within the block, calls through ``mesh`` retry without waiting: every retry the policy
    allows still happens (same attempts, same seeded choices), only the backoff sleeps,
    ``Retry-After`` included, are zero. Scoped to this mesh; the previous setting is restored
    on exit, so blocks nest."""
    before = mesh.instant_backoff
    mesh.instant_backoff = True
    try:
        yield mesh
    finally:
        mesh.instant_backoff = before


@pytest.fixture
def mesh_instant_retries(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """The project's mesh fixture, retrying without backoff for this test only."""
    with instant_retries(_find_mesh(request)()) as mesh:
        yield mesh


@pytest.fixture
def mesh_faults(request: pytest.FixtureRequest) -> Iterator[FaultInjector]:
    """Inject faults into calls made through a mesh, for this test only."""
    injector = FaultInjector(_requested_mesh(request), find_mesh=_find_mesh(request))
    try:
        yield injector
    finally:
        injector.clear()
