"""PES meta-training of learned optimizers (spec D): tasks, truncated inner problems, PES, the outer loop
(``python -m optim.meta``) and evaluation against AdamW (``python -m optim.meta.evaluate``)."""
