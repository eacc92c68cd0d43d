"""What an exception that leaves a mesh call says about it (meshlib/errors.py): the line
:func:`describe` writes from the decision record, and :func:`annotate` adding it once."""

from __future__ import annotations

import types

import httpx
import pytest

import meshlib.errors
from meshlib.decision import AttemptRecord, Decision
from meshlib.errors import annotate, describe


def test_describe_names_service_backend_endpoints_attempts_and_reason() -> None:
    decision = Decision("reviews.default", 3, backend="reviews-v2.default", reason="timeout")
    decision.deadline = 0.3
    decision.attempts = [
        AttemptRecord(1, "127.0.0.1:9080", "status", 503),
        AttemptRecord(2, "127.0.0.1:9081", "timeout", hedge=True),
    ]
    assert describe(decision) == (
        "mesh call to reviews.default (backend reviews-v2.default) failed (timeout) after"
        " 2 attempts: 127.0.0.1:9080 503, 127.0.0.1:9081 timeout (hedge); deadline 0.3s"
    )


def test_describe_a_call_refused_before_any_attempt() -> None:
    decision = Decision("reviews.default", 1, backend="reviews.default", reason="circuit_open")
    assert describe(decision) == (
        "mesh call to reviews.default failed (circuit_open) after 0 attempts: no endpoint tried"
    )


def test_annotate_adds_a_note_once_and_keeps_type_and_message() -> None:
    error = httpx.ConnectError("[Errno 111] Connection refused")
    annotate(error, "mesh call to x failed")
    annotate(error, "mesh call to x failed")  # the same line again: not repeated
    assert type(error) is httpx.ConnectError
    assert str(error) == "[Errno 111] Connection refused"
    assert error.__notes__ == ["mesh call to x failed"]


def test_annotate_without_notes_extends_the_message_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.10 has no exception notes (and its tracebacks print none): the message says it."""
    monkeypatch.setattr(meshlib.errors, "sys", types.SimpleNamespace(version_info=(3, 10, 13)))
    error = httpx.ConnectError("[Errno 111] Connection refused")
    annotate(error, "mesh call to x failed")
    annotate(error, "mesh call to x failed")
    assert type(error) is httpx.ConnectError
    assert str(error) == "[Errno 111] Connection refused\nmesh call to x failed"
    assert not hasattr(error, "__notes__")
