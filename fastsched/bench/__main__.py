"""``python -m fastsched.bench [options]`` is ``fastsched bench [options]``."""

import sys

from fastsched.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
