"""The hint a passed-through call gets when its host did not resolve (outbound/egress.py)."""

from __future__ import annotations

import socket

import httpcore
import httpx
import pytest

from meshlib.outbound.egress import close_service, pass_through_hint, unresolved

SERVICES = ["ratings.default", "reviews.default", "payments.shop"]


@pytest.mark.parametrize(
    ("host", "close"),
    [
        ("ratngs", "ratings"),  # own namespace: the short name resolves
        ("Reveiws", "reviews"),
        ("ratings.defualt", "ratings.default"),
        ("paymnts.shop", "payments.shop"),  # another namespace: the name a caller must write
        ("payment", "payments.shop"),
        ("inventory", None),
        ("example.com", None),
    ],
)
def test_close_service(host: str, close: str | None) -> None:
    assert close_service(host, SERVICES, "default") == close


def test_unresolved_looks_for_the_failed_lookup_below_the_httpx_error() -> None:
    lookup = socket.gaierror(-2, "Name or service not known")
    low = httpcore.ConnectError(str(lookup))
    low.__cause__ = lookup
    error = httpx.ConnectError(str(low))
    error.__cause__ = low
    assert unresolved(error)
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    assert not unresolved(refused)


def test_pass_through_hint() -> None:
    assert pass_through_hint("ratngs", "ratings") == (
        "mesh: 'ratngs' is not a mesh service; did you mean 'ratings'?"
    )
    assert "is not a mesh service" in (pass_through_hint("inventory", None) or "")
    assert pass_through_hint("example.invalid", None) is None  # a DNS name: not ours to judge
