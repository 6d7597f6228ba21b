"""The instruments around the trainer: optimizer comparisons, run plans, benchmarks, sampling, documentation
tables. Each module is a command (``python -m tools.<name>``); the trainer (``train``) imports none of them."""
