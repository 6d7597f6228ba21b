"""``python -m train --config configs/<preset>.py [--config.<field>=<value> ...]``

Resumes from the newest usable checkpoint in ``--config.workdir``. SIGTERM/SIGINT: finish the step, write
a checkpoint, exit 0 (a second signal exits at once). Multi-process jobs: ``--config.multiprocess=True``
(see ``train.build.setup_platform``; ``python -m launch.local`` starts one on this host).
"""
import os

from absl import app, logging
from ml_collections import config_flags

import configs
from infra.cli import library_log, parse_flags_or_exit, user_errors

# The default config is the installed one, wherever the command runs from; a given --config path is relative
# to the current directory, like the paths inside a config (workdir, data.dir, init_from).
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(configs.__file__), "default.py"),
                                          "Run config (a python file).")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    from infra.files import is_uri, resolve
    from infra.lease import LeaseError
    from train.build import setup_platform
    from train.loop import NonFiniteLoss, train
    from train.spikes import LossSpikes

    with user_errors(NonFiniteLoss, LossSpikes, LeaseError):
        cfg = _CONFIG.value  # a config file that failed to load raises when first read
        if not is_uri(cfg.workdir):  # what libraries report at length while the run fails: beside the run
            library_log(os.path.join(resolve(cfg.workdir), "library.log"))
        setup_platform(cfg)
        summary = train(cfg)
    if "note" in summary:
        print(summary["note"])
        return
    # a run stopped before its first evaluation has no eval loss; a data dir without byte counts no bits per byte
    named = (("loss", "train loss"), ("eval_loss", "eval loss"), ("eval_bpb", "eval bits/byte"),
             ("eval_loss_full", "full held-out loss"), ("eval_bpb_full", "bits/byte"))
    losses = ", ".join(f"{name} {summary[key]:.4f}" for key, name in named if key in summary)
    msg = (f"done: step {summary['step']}, {losses} (unigram entropy {summary['unigram_entropy']:.4f}); outputs in "
           f"{resolve(cfg.workdir)}")
    if "plot" in summary:
        msg += f" (plot: {summary['plot']})"
    print(("stopped early and checkpointed; rerun the same command to resume. " if summary["stopped_early"]
           else "") + msg)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
