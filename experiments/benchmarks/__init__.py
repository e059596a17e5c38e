"""Speed claims, measured as ratios side by side in one run (tests never time anything).

Each module here exposes ``run(quick: bool) -> dict``. ``fedsynth benchmark`` (or
``python -m experiments.benchmarks``) runs them all and writes BENCHMARKS.md.
"""
