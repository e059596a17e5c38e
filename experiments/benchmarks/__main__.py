"""``python -m experiments.benchmarks [--quick] [--out BENCHMARKS.md]``."""

import sys

from experiments.cli import main

sys.exit(main(["benchmark", *sys.argv[1:]]))
