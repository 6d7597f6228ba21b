"""The instruments around the trainer: comparisons, run plans, benchmarks, sampling and the docs' generated tables."""
