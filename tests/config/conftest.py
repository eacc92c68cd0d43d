"""Fixtures shared by the policy-loading tests."""

from __future__ import annotations

from typing import Any

import pytest

from meshlib.config import loader


@pytest.fixture
def parsed_texts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every text the loader parses from here on (``read_documents``), in order:
    what a test of the reload cache counts to see which files were parsed again."""
    parsed: list[int] = []
    real = loader.read_documents

    def counting(text: str) -> Any:
        parsed.append(len(text))
        return real(text)

    monkeypatch.setattr(loader, "read_documents", counting)
    return parsed
