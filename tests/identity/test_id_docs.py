"""docs/security.md shows real code: its Python snippet runs and its CLI verbs exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshlib.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def test_python_snippet_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(DOC), "exec"), {})
    assert "leaf certificate has expired" in capsys.readouterr().out


@pytest.mark.parametrize("verb", ["init", "issue", "inspect", "rotate", "bundle", "revoke"])
def test_documented_ca_verbs_exist(verb: str) -> None:
    assert f"meshctl ca {verb}" in DOC.read_text()
    assert main(["ca", verb, "--help"]) == 0
