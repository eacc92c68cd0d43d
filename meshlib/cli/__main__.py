"""``python -m meshlib.cli``: the same as the ``meshctl`` console script."""

import sys

from meshlib.cli.main import main

sys.exit(main())
