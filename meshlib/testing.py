"""pytest plugin (entry point ``pytest11``): fault injection into mesh calls for one test.

A test asks for the ``mesh_faults`` fixture and says what should go wrong; the faults apply
to calls made through the mesh for the duration of that test only, then vanish::

    def test_ratings_outage(mesh, mesh_faults):
        mesh_faults.abort("ratings", status=503, percent=50)
        mesh_faults.delay("reviews", 2.0, headers={"end-user": "jason"})
        mesh_faults.refuse("details")
        ...

The mesh is the test's own ``mesh`` fixture when it has one, or any mesh passed explicitly
(``mesh_faults.abort("ratings", status=503, mesh=other_mesh)``). Nothing here is global:
faults live on the mesh object and are removed at teardown. See docs/testing.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import pytest

from meshlib.mesh import FaultHandle, Mesh

__all__ = ["FaultInjector", "mesh_faults"]


class FaultInjector:
    """Adds run-time faults to meshes and removes them all on :meth:`clear`."""

    def __init__(
        self,
        default_mesh: Mesh | None = None,
        *,
        find_mesh: Callable[[], Mesh | None] | None = None,
    ) -> None:
        self._default = default_mesh
        self._find_mesh = find_mesh  # looked up on first use when there is no default
        self._handles: list[FaultHandle] = []

    def _mesh(self, mesh: Mesh | None) -> Mesh:
        if mesh is None and self._default is None and self._find_mesh is not None:
            self._default = self._find_mesh()
        target = mesh if mesh is not None else self._default
        if target is None:
            raise LookupError(
                "mesh_faults needs a mesh: define a `mesh` fixture or pass mesh=... explicitly"
            )
        return target

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


@pytest.fixture
def mesh_faults(request: pytest.FixtureRequest) -> Iterator[FaultInjector]:
    """Inject faults into calls made through a mesh, for this test only."""

    def find_mesh() -> Mesh | None:
        # A `mesh` fixture the test did not request itself is still found, on first use.
        try:
            candidate = request.getfixturevalue("mesh")
        except pytest.FixtureLookupError:
            return None
        return candidate if isinstance(candidate, Mesh) else None

    default = find_mesh() if "mesh" in request.fixturenames else None
    injector = FaultInjector(default, find_mesh=find_mesh)
    try:
        yield injector
    finally:
        injector.clear()
