"""Shared policy fragments and assertion helpers for the config tests."""

from __future__ import annotations

import textwrap

import pytest

from meshlib.config.loader import load_text
from meshlib.config.model import Snapshot
from meshlib.errors import ConfigError, Problem

SERVICES = """\
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews}
spec:
  serviceAccount: reviews
  endpoints: [{address: "127.0.0.1:9080"}]
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews-v1}
spec: {endpoints: [{address: "127.0.0.1:9081"}]}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews-v2}
spec: {endpoints: [{address: "127.0.0.1:9082"}]}
---
apiVersion: meshlib/v1
kind: Service
metadata: {name: ratings}
spec: {serviceAccount: ratings}
"""
#: Number of documents in SERVICES: a document appended after it is document N + 1.
N_SERVICES = 4


def doc(text: str) -> str:
    return textwrap.dedent(text).strip("\n") + "\n"


def with_services(*docs: str) -> str:
    return SERVICES + "".join("---\n" + doc(d) for d in docs)


def load(*docs: str) -> Snapshot:
    return load_text(with_services(*docs), source="test.yaml")


def problems(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_text(text, source="test.yaml")
    return list(info.value.problems)


def problems_with_services(*docs: str) -> list[Problem]:
    return problems(with_services(*docs))


def find(found: list[Problem], field: str, contains: str = "") -> Problem:
    """The one problem on ``field`` whose message contains ``contains``."""
    hits = [p for p in found if p.field == field and contains in p.message]
    assert hits, f"no problem on {field!r} containing {contains!r}; got:\n" + "\n".join(
        str(p) for p in found
    )
    return hits[0]


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line number of the nth line containing ``needle``."""
    seen = 0
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            seen += 1
            if seen == nth:
                return number
    raise AssertionError(f"{needle!r} not in text")
