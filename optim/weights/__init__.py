"""The shipped learned-optimizer weights (``celo2.state``, ``celo2-base.state``, ``velo.state``, each with a JSON
record of how it was made) and ``python -m optim.weights``, which inspects and converts weight files."""
