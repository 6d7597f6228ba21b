"""``python -m optim.learned.meta --variant celo2 --workdir DIR``: PES meta-training (see optim/learned/meta/run.py)."""
from infra.cli import user_errors
from optim.learned.meta.run import main

if __name__ == "__main__":
    with user_errors():
        main()
