"""``python -m mlakv``: the same as the ``mlakv`` script."""

import sys

from .cli import main

sys.exit(main())
