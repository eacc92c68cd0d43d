"""The demo's progress line (examples/demo.py ``ProgressLine``): redrawn in place with ``\\r``
on a terminal only; piped, every update is a plain line, so a log file or CI output reads
cleanly. (tests/test_examples.py runs the whole demo with its output piped.)"""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("meshlib_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_piped_every_update_is_a_line(demo: ModuleType) -> None:
    out = io.StringIO()
    line = demo.ProgressLine(out)
    line.show("  1.0s/2s  calls 10")
    line.show("  2.0s/2s  calls 20")
    line.end()
    assert out.getvalue() == "  1.0s/2s  calls 10\n  2.0s/2s  calls 20\n"
    assert line.interval == 1.0


def test_on_a_terminal_the_line_is_redrawn_in_place(demo: ModuleType) -> None:
    out = Terminal()
    line = demo.ProgressLine(out)
    line.show("  1.0s/2s  calls 10")
    line.show("  2.0s/2s  calls 20")
    line.end()
    assert out.getvalue() == "\r  1.0s/2s  calls 10\r  2.0s/2s  calls 20\n"
    assert line.interval == 0.25


def test_nothing_shown_writes_nothing(demo: ModuleType) -> None:
    for out in (io.StringIO(), Terminal()):
        demo.ProgressLine(out).end()
        assert out.getvalue() == ""
