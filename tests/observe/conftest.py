"""Observe fixtures: the policy core's fake clock and meshes, and the end-to-end meshes and
callers (sync and async), reused as they are."""

from __future__ import annotations

from e2e.conftest import caller, make_mesh
from policy.conftest import clock, mesh_for

__all__ = ["caller", "clock", "make_mesh", "mesh_for"]
