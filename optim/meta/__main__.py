"""``python -m optim.meta --variant celo2 --workdir DIR``: PES meta-training (see optim/meta/run.py)."""
from optim.meta.run import main

if __name__ == "__main__":
    main()
