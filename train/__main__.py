"""``python -m train --config configs/<preset>.py [--config.<field>=<value> ...]``

Resumes from the newest usable checkpoint in ``--config.workdir``. SIGTERM/SIGINT: finish the step, write
a checkpoint, exit 0 (a second signal exits at once). Multi-process jobs: ``--config.multiprocess=True``
(see ``train.build.setup_platform``; ``python -m launch.local`` starts one on this host).
"""
import os
import sys

from absl import app, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Run config (a python file).")


def main(argv) -> None:
    del argv
    cfg = _CONFIG.value
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    from train.build import setup_platform
    from train.loop import NonFiniteLoss, train

    setup_platform(cfg)
    try:
        summary = train(cfg)
    except (ValueError, FileNotFoundError, NonFiniteLoss) as e:
        if os.environ.get("TRAIN_DEBUG"):
            raise
        print(f"error: {e}\n(set TRAIN_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    if "note" in summary:
        print(summary["note"])
        return
    msg = (f"done: step {summary['step']}, train loss {summary.get('loss', float('nan')):.4f}, "
           f"eval loss {summary.get('eval_loss', float('nan')):.4f} (unigram entropy "
           f"{summary['unigram_entropy']:.4f}); outputs in {os.path.abspath(cfg.workdir)}")
    if "plot" in summary:
        msg += f" (plot: {summary['plot']})"
    print(("stopped early and checkpointed; rerun the same command to resume. " if summary["stopped_early"]
           else "") + msg)


if __name__ == "__main__":
    app.run(main)
