"""``meshctl``: the command line, one module per verb group (the console script's entry point).

``main`` builds the parser from the groups ``policy``, ``ca`` and ``observe`` and runs a verb;
``command`` holds what the groups share.
"""

from meshlib.cli.main import main

__all__ = ["main"]
