"""Run the benchmark from a checkout: ``python bench/run.py [options]`` = ``fastsched bench``.

See ``fastsched bench --help``. Results go to bench/results/ (JSON, Markdown, PNG).
"""

import sys

from fastsched.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
