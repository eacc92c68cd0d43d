"""``meshctl``: builds the parser from the verb groups and runs one verb.

The verb groups: :mod:`meshlib.cli.policy` (validate, schema, explain: policy files),
:mod:`meshlib.cli.ca` (the built-in CA), :mod:`meshlib.cli.observe` (status, tap, top,
graph: running services), :mod:`meshlib.cli.registry` (the registry service),
:mod:`meshlib.cli.registry_client` (apply, get, history, rollback: a running registry),
:mod:`meshlib.cli.token` (a running registry's join tokens) and :mod:`meshlib.cli.gateway`
(the ingress gateway: serve, validate). Adding a
verb means adding a registrar and its handler to the group it belongs to and listing it in that
group's ``VERBS``; a new group is listed in :data:`GROUPS`. ``version`` and ``completion`` are
about meshctl itself and live here: the completion script is drawn from the finished parser.
Exit status: 0 ok, 1 invalid configuration (or a failed command), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from meshlib.cli import ca, gateway, observe, policy, registry, registry_client, token
from meshlib.cli.command import (
    EXIT_INVALID,
    EXIT_OK,
    EXIT_USAGE,
    CommandFailed,
    Handler,
    Subparsers,
    UsageError,
)
from meshlib.cli.completion import SHELLS, completion_script

#: The verb groups, in the order ``meshctl --help`` lists their verbs.
GROUPS = (policy, ca, observe, registry, registry_client, token, gateway)


def _version() -> str:
    # The installed distribution's version: the package's own __init__ is above the CLI.
    try:
        return f"meshctl {version('meshlib')}"
    except PackageNotFoundError:  # pragma: no cover - run from a source tree, not installed
        return "meshctl (not installed: version unknown)"


VERSION = _version()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshctl", description="meshlib command line: validate and explain mesh policy."
    )
    parser.add_argument("--version", action="version", version=VERSION)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for group in GROUPS:
        for add in group.VERBS:
            add(sub)
    _add_own_verbs(sub, parser)
    return parser


def _add_own_verbs(sub: Subparsers, parser: argparse.ArgumentParser) -> None:
    version = sub.add_parser("version", help="print meshctl's version (as --version)")
    version.set_defaults(func=_cmd_version)
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script for SHELL: "
        "bash: 'source <(meshctl completion bash)'; "
        "zsh: 'source <(meshctl completion zsh)' after compinit; "
        "fish: 'meshctl completion fish | source'.",
    )
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")

    def _cmd_completion(args: argparse.Namespace) -> int:
        sys.stdout.write(completion_script(parser, args.shell))
        return EXIT_OK

    completion.set_defaults(func=_cmd_completion)


def _cmd_version(args: argparse.Namespace) -> int:
    print(VERSION)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Handler = args.func
    # "meshctl ca issue: ...", not "meshctl ca: ...", for a verb with sub-verbs
    sub_verb = next(
        (
            v
            for v in (
                getattr(args, f"{g}_verb", None)
                for g in ("ca", "registry", "get", "token", "gateway")
            )
            if v
        ),
        None,
    )
    said = " ".join(v for v in (args.verb, sub_verb) if v)
    try:
        return handler(args)
    except UsageError as exc:
        print(f"meshctl {said}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandFailed as exc:
        print(f"meshctl {said}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except BrokenPipeError:  # e.g. `meshctl schema | head`
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
