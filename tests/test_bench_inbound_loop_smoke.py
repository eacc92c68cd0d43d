"""Smoke test of ``benchmarks/inbound_loop.py``: every variant runs, answers 200 (the loop raises
otherwise) and is reported, and ``mesh+authz`` really evaluates authorization. The numbers are
not checked: a few hundred requests mean nothing."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from benchmarks import inbound_loop


def test_every_variant_is_measured_and_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert inbound_loop.main(["--calls", "200", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    for name in inbound_loop.VARIANTS:
        assert re.search(rf"^\| {re.escape(name)} \| \d+\.\d\d \| ", out, re.MULTILINE), out


@pytest.mark.parametrize(("variant", "status"), [("mesh", 200), ("mesh+authz", 403)])
def test_only_the_authz_variant_refuses_other_paths(variant: str, status: int) -> None:
    app = inbound_loop.build(variant)
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    scope = inbound_loop.request_scope()
    scope.update(path="/admin", raw_path=b"/admin")
    asyncio.run(app(scope, inbound_loop._receive, send))
    assert sent[0]["status"] == status
