"""``meshctl``: builds the parser from the verb groups and runs one verb.

The verb groups: :mod:`meshlib.cli.policy` (validate, schema, explain: policy files),
:mod:`meshlib.cli.ca` (the built-in CA) and :mod:`meshlib.cli.observe` (status, tap, top,
graph: running services). Adding a verb means adding a registrar and its handler to the group
it belongs to and listing it in that group's ``VERBS``; a new group (``registry``) is listed in
:data:`GROUPS`. Exit status: 0 ok, 1 invalid configuration (or a failed command), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys

from meshlib.cli import ca, observe, policy
from meshlib.cli.command import EXIT_OK, EXIT_USAGE, Handler, UsageError

#: The verb groups, in the order ``meshctl --help`` lists their verbs.
GROUPS = (policy, ca, observe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshctl", description="meshlib command line: validate and explain mesh policy."
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for group in GROUPS:
        for add in group.VERBS:
            add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler = args.func
    try:
        return handler(args)
    except UsageError as exc:
        print(f"meshctl {args.verb}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # e.g. `meshctl schema | head`
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
