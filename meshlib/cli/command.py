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


def add_output_option(parser: argparse.ArgumentParser) -> None:
    """Give a verb that prints results ``-o/--output text|json|yaml`` (default text)."""
    parser.add_argument(
        "-o",
        "--output",
        choices=OUTPUT_FORMATS,
        default="text",
        help="text (default), or one json/yaml document with the keys docs/cli.md lists",
    )


def print_document(document: Mapping[str, Any], output: str, out: TextIO | None = None) -> None:
    """Print one result document as JSON (indented by 2) or YAML, keys in the order given."""
    stream = out if out is not None else sys.stdout
    if output == "json":
        stream.write(json.dumps(document, indent=2) + "\n")
    elif output == "yaml":
        import yaml  # only when asked: most runs print text

        stream.write(
            yaml.safe_dump(dict(document), sort_keys=False, allow_unicode=True, width=1 << 20)
        )
    else:  # pragma: no cover - a verb prints its own text
        raise ValueError(f"not a document format: {output!r}")
