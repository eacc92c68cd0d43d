"""Calls to hosts outside the mesh: what a passed-through call that failed to resolve says, when
its host is one typo away from a mesh service (``http://ratngs/`` for ``ratings``)."""

from __future__ import annotations

import socket
from collections.abc import Iterable

#: How far down an exception's cause chain to look for the failed name lookup (httpx wraps
#: httpcore's error, which wraps the ``socket.gaierror``: depth 2).
_CHAIN_DEPTH = 8


def unresolved(error: BaseException) -> bool:
    """Whether ``error`` was caused by a failed name lookup (a ``socket.gaierror`` below it)."""
    cause: BaseException | None = error
    for _ in range(_CHAIN_DEPTH):
        if cause is None:
            return False
        if isinstance(cause, socket.gaierror):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def close_service(host: str, services: Iterable[str], namespace: str) -> str | None:
    """The mesh service ``host`` was probably meant to name, spelt as a caller in
    ``namespace`` would write it (``ratings`` in its own namespace, ``ratings.shop`` in
    another), or None when no service name is close (difflib, as the policy file's field-name
    hints)."""
    names: list[str] = []
    for key in services:  # keys are name.namespace
        name, _, ns = key.partition(".")
        if ns == namespace:
            names.append(name)
        names.append(key)
    import difflib  # only a failed name lookup asks: not loaded at start-up

    close = difflib.get_close_matches(host.lower().rstrip("."), names, n=1, cutoff=0.6)
    return close[0] if close else None


def pass_through_hint(host: str, suggestion: str | None) -> str | None:
    """The line a passed-through call's name-lookup failure gets, or None: a hint when a mesh
    service has a close name, or — a single-label host, which only a mesh or a local resolver
    could know — that it is not a mesh service."""
    if suggestion is not None:
        return f"mesh: {host!r} is not a mesh service; did you mean {suggestion!r}?"
    if "." not in host.rstrip("."):
        return (
            f"mesh: {host!r} is not a mesh service (passed through, egress: allow-any) "
            "and no resolver knows it"
        )
    return None
