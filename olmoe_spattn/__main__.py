"""``python -m olmoe_spattn``: the same as the ``olmoe-spattn`` command."""

import sys

from .cli import main

sys.exit(main())
