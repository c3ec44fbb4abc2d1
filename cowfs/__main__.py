"""``python -m cowfs``: the same as the ``cowfs`` command."""

import sys

from .cli import main

sys.exit(main())
