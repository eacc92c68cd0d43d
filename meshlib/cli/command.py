"""What every ``meshctl`` verb group shares: the exit statuses, the usage error, the registrar.

A verb group (:mod:`meshlib.cli.policy`, :mod:`meshlib.cli.ca`, :mod:`meshlib.cli.observe`)
lists its registrars in ``VERBS``; a registrar adds one sub-parser whose ``func`` runs the
verb and returns the exit status. :mod:`meshlib.cli.main` builds the parser from the groups.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

EXIT_OK = 0
EXIT_INVALID = 1  # invalid configuration, or a command that failed
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]
# A string: argparse's action class is generic only to type checkers.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Registrar = Callable[[Subparsers], None]


class UsageError(Exception):
    """A problem with the command line rather than with the policy (exit status 2)."""
