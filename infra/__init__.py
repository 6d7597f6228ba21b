"""Run infrastructure shared by training (``train``) and meta-training (``optim.meta``): signals and
preemption, atomic file writes, the metrics writer, and orbax checkpoints. It imports nothing of ours, so
every package may use it without importing upward."""
