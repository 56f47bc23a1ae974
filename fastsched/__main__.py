"""``python -m fastsched`` runs the ``fastsched`` command (for when its script is not on PATH)."""

import sys

from fastsched.cli import main

sys.exit(main())
