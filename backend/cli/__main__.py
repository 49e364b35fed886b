"""``python -m backend.cli``: the ``osprey-label`` command without its console script."""

import sys

from backend.cli import main

sys.exit(main())
