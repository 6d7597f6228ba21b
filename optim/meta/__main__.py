"""``python -m optim.meta --variant celo2 --workdir DIR``: PES meta-training (see optim/meta/run.py)."""
from infra.cli import user_errors
from optim.meta.run import main

if __name__ == "__main__":
    with user_errors():
        main()
