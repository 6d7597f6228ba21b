"""The shipped learned-optimizer weights (``celo2.state``, ``celo2_base.state``, ``velo.state``, each with a
JSON record of how it was made and its plots; docs/learned_optimizers.md#shipped-weights) and
``python -m optim.learned.weights``, which inspects and converts weight files."""
