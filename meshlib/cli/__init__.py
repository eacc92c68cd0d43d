"""``meshctl``: the command line, one module per verb group (the console script's entry point).

``main`` builds the parser and dispatches; ``observe`` reads a running service's admin app.
"""

from meshlib.cli.main import main

__all__ = ["main"]
