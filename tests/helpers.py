"""Shared test utilities: small configs and synthetic batches for the sharded train step."""
import jax
import numpy as np

from configs.base import base_config
from configs.cpu_tiny import get_config as cpu_tiny_config
from optim.registry import resolve_defaults
from train.build import build_run
from train.config import load_config

VOCAB = 256


def synthetic_batches(n, batch=8, seq=32, seed=0):
    """Token batches with learnable structure (each token predicts the next as (t*7+3) % VOCAB)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = rng.integers(0, VOCAB, (batch, 1))
        seq_ids = (start * np.power(7, np.arange(seq + 1)) % VOCAB + 3 * np.arange(seq + 1)) % VOCAB
        seg = np.where(np.arange(seq) < seq // 2, 1, 2)[None].repeat(batch, 0)
        out.append(dict(inputs=seq_ids[:, :-1].astype(np.int32), targets=seq_ids[:, 1:].astype(np.int32),
                        segment_ids=seg.astype(np.int32), loss_mask=np.ones((batch, seq), np.float32)))
    return out


def optimizer_config(name="adamw", **overrides):
    """The base optimizer config for ``name``, resolved (``resolve_defaults``: its default lr, and for learned
    optimizers the shipped weights), as the trainer resolves it when it loads a config."""
    cfg = base_config().optimizer
    cfg.name = name
    cfg.warmup_steps = 2
    # Celo2's AdamW branch (embeddings, vectors) at the same lr as the learned rule: the default 20x
    # (meta-training's mult_1d) is too hot for the synthetic 10-step task's embeddings.
    cfg.celo2.adam_lr_mult = 1.0
    cfg.update(overrides)
    return resolve_defaults(cfg)


def tiny_config(workdir, data_dir, **overrides):
    """The cpu-tiny preset (2-layer GPT, 2x2x2 mesh) writing to ``workdir`` and reading ``data_dir``."""
    cfg = cpu_tiny_config()
    cfg.workdir = str(workdir)
    cfg.data.dir = str(data_dir)
    cfg.update(overrides)
    return cfg


def tiny_run(opt_cfg, mesh_shape, steps=20, batch_size=8, seq_len=32, microbatches=1, model="cpu-tiny"):
    """The run of ``model`` (vocabulary VOCAB) with ``opt_cfg`` on the first devices, as a mesh of
    ``mesh_shape`` (data, fsdp, tensor)."""
    cfg = base_config()
    cfg.model.update(name=model, vocab_size=VOCAB, vocab_multiple=1)
    cfg.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    cfg.update(steps=steps, batch_size=batch_size, seq_len=seq_len, microbatches=microbatches, optimizer=opt_cfg)
    return build_run(load_config(cfg), jax.devices()[:int(np.prod(mesh_shape))])


def run_steps(mesh_shape, opt_cfg, batches, microbatches=1, model="cpu-tiny", steps_total=20):
    """Train on the given synthetic batches; returns (final state, losses, layout, mesh)."""
    batch, seq = batches[0]["inputs"].shape
    run = tiny_run(opt_cfg, mesh_shape, steps_total, batch, seq, microbatches, model)
    state = run.init_state()
    losses = []
    with jax.set_mesh(run.mesh):
        for b in batches:
            state, m = run.train_step(state, jax.device_put(b, run.batch_sharding))
            losses.append(float(m["loss"]))
    return state, np.array(losses), run.layout, run.mesh
