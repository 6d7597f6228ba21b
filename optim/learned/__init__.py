"""The learned optimizers: Celo2 and Celo2-base (``optim.learned.celo2``), VeLO (``optim.learned.velo``), the
per-element machinery they share (``core``), their weight-file formats (``msgpack_file``, ``celo2_file``,
``velo_file``), the shipped weights with ``python -m optim.learned.weights`` (``weights``), and PES
meta-training, ``python -m optim.learned.meta`` (``meta``). The math: docs/learned_optimizers.md; the files:
docs/weight_formats.md; meta-training: docs/meta_training.md. Configured runs build them through
``optim.registry``. (The package imports nothing itself: its modules are named like their optimizers.)"""
