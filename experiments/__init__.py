"""The workbench: the ``fedsynth`` CLI, pretraining, the demo cohort, sweeps, benchmarks."""
