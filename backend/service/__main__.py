"""``python -m backend.service``: the ``osprey-label`` command without its console script."""

import sys

from backend.service.command import main

sys.exit(main())
