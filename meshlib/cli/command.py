"""What every ``meshctl`` verb group shares: the exit statuses, the usage error, the registrar,
and the ``-o json|yaml`` output of verbs that print results.

A verb group (:mod:`meshlib.cli.policy`, :mod:`meshlib.cli.ca`, :mod:`meshlib.cli.observe`)
lists its registrars in ``VERBS``; a registrar adds one sub-parser whose ``func`` runs the
verb and returns the exit status. :mod:`meshlib.cli.main` builds the parser from the groups.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO, TypeAlias

from meshlib.errors import ConfigError

EXIT_OK = 0
EXIT_INVALID = 1  # invalid configuration, or a command that failed
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]
# A string: argparse's action class is generic only to type checkers.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Registrar = Callable[[Subparsers], None]

#: ``-o`` values: human text (the default), or one JSON / YAML document whose keys docs/cli.md
#: lists (kubectl's and istioctl's flag, so scripts need not scrape the text).
OUTPUT_FORMATS = ("text", "json", "yaml")


class UsageError(Exception):
    """A problem with the command line rather than with the policy (exit status 2)."""


class CommandFailed(Exception):
    """The verb could not do its work: a bad file, an unreachable URL, a refused CA step (exit
    status 1). The message is the one line printed after ``meshctl VERB:``."""


def print_problems(error: ConfigError) -> None:
    """Every problem of ``error`` on its own stderr line (``file:line: ...``), then how many
    when there are several: one problem is its own one-line reason (DESIGN.md §7)."""
    for problem in error.problems:
        print(problem, file=sys.stderr)
    if len(error.problems) > 1:
        print(f"{len(error.problems)} problems found", file=sys.stderr)


def positive_seconds(text: str) -> float:
    """An argparse ``type=`` for a duration in seconds that must be above zero (a zero
    timeout would make every read fail at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def add_output_option(parser: argparse.ArgumentParser, *, json_alias: bool = False) -> None:
    """Give a verb that prints results ``-o/--output text|json|yaml`` (default text); with
    ``json_alias`` also ``--json`` (the observe verbs had it before ``-o``)."""
    parser.add_argument(
        "-o",
        "--output",
        choices=OUTPUT_FORMATS,
        default="text",
        help="text (default), or one json/yaml document with the keys docs/cli.md lists",
    )
    if json_alias:
        parser.add_argument(
            "--json", dest="output", action="store_const", const="json", help="the same as -o json"
        )


def format_document(document: Any, output: str) -> str:
    """One result document as JSON (indented by 2, UTF-8 kept) or YAML (block style, keys in
    the order given), without a final newline."""
    if output == "json":
        return json.dumps(document, indent=2, ensure_ascii=False)
    if output == "yaml":
        import yaml  # only when asked: most runs print text

        text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=1 << 20)
        return str(text).rstrip("\n")
    raise ValueError(f"not a document format: {output!r}")


def print_document(document: Mapping[str, Any], output: str, out: TextIO | None = None) -> None:
    """Print one result document as JSON or YAML (:func:`format_document`)."""
    stream = out if out is not None else sys.stdout
    stream.write(format_document(dict(document), output) + "\n")
