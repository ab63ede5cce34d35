"""``python -m rebasin_callbacks``: the ``rebasin`` command."""

import sys

from rebasin_callbacks.cli import main

sys.exit(main())
