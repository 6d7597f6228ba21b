"""PES meta-training of learned optimizers (docs/meta_training.md#running-it): tasks, truncated inner
problems, PES, the outer loop (``python -m optim.learned.meta``) and evaluation against AdamW
(``python -m optim.learned.meta.evaluate``)."""
