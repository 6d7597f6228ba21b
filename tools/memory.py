"""Analytic per-device memory of a train step: an estimate, for devices that cannot be compiled for here (GPUs).

The state (float32 params, optimizer state) is counted exactly from the run's layout: every leaf's shard
shape on the mesh. Gradients are float32 and sharded like the params; gradient accumulation
(``microbatches > 1``) keeps a second params-sized accumulator. Activations are counted per token of one
device's microbatch, ``T = b * L`` with ``b = batch / (microbatches * data * fsdp)`` rows, in the compute
dtype (``e`` bytes), with ``t`` the tensor-parallel size (it splits heads and the MLP width, not d_model):

    saved by every layer, per token (what the backward pass keeps from the forward pass)
        none           5D + (4D + 2F)/t  + attention probabilities N/t * L      (xla attention)
        dots           3D + (4D + F)/t   + attention scores N/t * L             (xla attention)
        dots_no_batch  3D + (3D + F)/t
        full           D                                                        (the block's input)
      a fused attention kernel keeps no L x L tensor, only a float32 log-sum-exp per head (N/t * 4 bytes);
      a SwiGLU MLP keeps one more F-wide tensor than GELU's (none, dots, dots_no_batch: +F/t: gate and up are
      both matmul outputs); QK-norm and rotary positions each keep another copy of q and k (none: +2D/t each).
    one layer recomputed during the backward pass (remat policies): its "none" set, twice (values and
    their gradients);
    the output layer: float32 logits [T, V/t] (their gradient overwrites them), or [b * loss_chunk, V/t]
    with a chunked loss.

This ignores XLA's fusion and buffer reuse (which lower it) and the all-gathered weights of the layer in
flight (small at these sizes); ``python -m tools.plan --topology`` compares it with a compiled TPU program.
"""
from __future__ import annotations

import math

import jax

def shard_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree whose leaves carry shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def saved_per_token(model_cfg, tensor: int, seq_len: int, remat: str) -> float:
    """Activation bytes one layer keeps per token for the backward pass under ``remat`` (see module doc)."""
    D, N, t = model_cfg.d_model, model_cfg.n_heads, tensor
    F = model_cfg.mlp_hidden
    e = 4 if model_cfg.compute_dtype == "float32" else 2
    attention = N / t * seq_len * e if model_cfg.attention == "xla" else N / t * 4  # fused: log-sum-exp
    elements = {"none": 5 * D + (4 * D + 2 * F) / t, "dots": 3 * D + (4 * D + F) / t,
                "dots_no_batch": 3 * D + (3 * D + F) / t, "full": D}[remat]
    traits = model_cfg.traits
    if remat != "full" and traits.mlp == "swiglu":
        elements += F / t
    if remat == "none":
        elements += 2 * D / t * (traits.qk_norm + (model_cfg.positions == "rotary"))
    return elements * e + (attention if remat in ("none", "dots") else 0.0)


def activation_bytes(model_cfg, *, rows: int, seq_len: int, tensor: int, remat: str, loss_chunk: int) -> dict:
    """Per-device activation bytes of one microbatch of ``rows`` sequences: layers, recompute, logits."""
    tokens = rows * seq_len
    layers = model_cfg.n_layers * tokens * saved_per_token(model_cfg, tensor, seq_len, remat)
    recompute = 0.0 if remat == "none" else 2 * tokens * saved_per_token(model_cfg, tensor, seq_len, "none")
    logit_tokens = rows * loss_chunk if loss_chunk else tokens
    logits = logit_tokens * model_cfg.vocab_size / tensor * 4
    return {"layers": layers, "recompute": recompute, "logits": logits}


def estimate(run, remat: str | None = None) -> dict:
    """The analytic per-device bytes of ``run``'s train step (``remat`` overrides the config's policy)."""
    cfg, mesh = run.cfg, run.mesh
    params = shard_bytes(run.layout.abstract.params)
    rows = cfg.batch_size // (cfg.microbatches * mesh.shape["data"] * mesh.shape["fsdp"])
    out = {"params": params, "optimizer_state": shard_bytes(run.layout.abstract.opt_state),
           "gradients": params * (2 if cfg.microbatches > 1 else 1)}
    out.update(activation_bytes(run.model_cfg, rows=rows, seq_len=cfg.seq_len, tensor=mesh.shape["tensor"],
                                remat=remat or run.model_cfg.remat, loss_chunk=cfg.loss_chunk))
    out["total"] = sum(out.values())
    return out
