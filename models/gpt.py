"""GPT-2 / GPT-3 (dense) decoder in flax NNX.

Pre-LayerNorm blocks, GELU MLP of width 4d, learned absolute positions, biases everywhere, and the output
head tied to the token embedding. Attention kernels keep the heads as a leading (batch) axis:

    qkv kernel  [3, N, D, H]   (q/k/v, heads, d_model, head_dim)
    out kernel  [N, H, D]

so that matrix-aware optimizers (Celo2, Muon) see per-head D x H matrices and tensor parallelism splits
the head axis N. All biases and norm parameters are vectors (the qkv bias is stored flat as [3*N*H]),
so "ndim <= 1" identifies exactly the non-matrix parameters.

Shapes in names: B batch, L sequence, D d_model, N heads, H head_dim, F mlp width, V vocab.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import CUDNN_NO_DOCUMENTS, IMPLS, attend
from models.partitioning import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    n_layers: int
    d_model: int
    n_heads: int
    ctx: int
    vocab_size: int = 50257
    mlp_ratio: int = 4
    dropout: float = 0.0
    compute_dtype: str = "float32"  # parameters stay float32 (master weights); activations in this dtype
    remat: str = "none"  # one of REMAT_POLICIES
    document_mask: bool = True  # block attention across document boundaries (segment ids)
    attention: str = "xla"  # the attention kernel: one of models.attention.IMPLS
    init_std: float = 0.02
    ln_eps: float = 1e-5

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.compute_dtype={self.compute_dtype!r} must be 'float32' or 'bfloat16'")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.attention not in IMPLS:
            raise ValueError(f"model.attention={self.attention!r} is not one of {list(IMPLS)} ('auto' is resolved "
                             f"from the devices' platform by train.build.build_model_config)")
        if self.attention == "cudnn" and self.document_mask:
            raise ValueError(CUDNN_NO_DOCUMENTS)
        if self.attention == "cudnn" and self.compute_dtype != "bfloat16":
            raise ValueError("model.attention='cudnn' takes bfloat16 inputs only: set model.compute_dtype="
                             "'bfloat16' or use model.attention='pallas_gpu'")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _param(rngs: nnx.Rngs, shape, axes, std: float | None) -> nnx.Param:
    """A float32 parameter with logical axis names: N(0, std^2) init, or zeros when std is None."""
    value = jnp.zeros(shape, jnp.float32) if std is None else std * jax.random.normal(rngs.params(), shape)
    return nnx.Param(value, axes=axes)


class LayerNorm(nnx.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis, computed in float32."""

    def __init__(self, d: int, eps: float):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((d,), jnp.float32), axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


def _dropout(x, rate: float, key):
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        D, N, H = cfg.d_model, cfg.n_heads, cfg.head_dim
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.qkv_kernel = _param(rngs, (3, N, D, H), ("qkv", "heads", "embed", "head_dim"), cfg.init_std)
        self.qkv_bias = _param(rngs, (3 * N * H,), ("norm",), None)
        self.out_kernel = _param(rngs, (N, H, D), ("heads", "head_dim", "embed"), resid_std)
        self.out_bias = _param(rngs, (D,), ("norm",), None)
        self.cfg = cfg

    def __call__(self, x_BxLxD, segment_ids_BxL, dropout_key=None):
        """Causal self-attention, within documents when ``segment_ids_BxL`` is given (``models.attention``)."""
        q, k, v = (constrain(t, ("batch", "length", "act_heads", None)) for t in self._qkv(x_BxLxD))
        y_BxLxNxH = attend(q, k, v, segment_ids_BxL, impl=self.cfg.attention)
        return _dropout(self._out(y_BxLxNxH), self.cfg.dropout, dropout_key)

    def decode(self, x_BxD, position, cache, layer: int):
        """One new position's attention over the cached keys and values of positions 0 .. ``position``: its
        own are written first into ``cache`` (keys, values [n_layers, B, T, N, H], at ``layer``, in place).
        Returns (y [B, D], the updated cache). One document: no segments."""
        q_BxNxH, k_BxNxH, v_BxNxH = (t[:, 0] for t in self._qkv(x_BxD[:, None]))
        cache = tuple(jax.lax.dynamic_update_slice(c, new[None, :, None].astype(c.dtype), (layer, 0, position, 0, 0))
                      for c, new in zip(cache, (k_BxNxH, v_BxNxH)))
        keys_BxTxNxH, values_BxTxNxH = cache[0][layer], cache[1][layer]
        scores_BxNxT = jnp.einsum("bnh,btnh->bnt", q_BxNxH, keys_BxTxNxH).astype(jnp.float32)
        scores_BxNxT = jnp.where(jnp.arange(keys_BxTxNxH.shape[1]) <= position,
                                 scores_BxNxT / math.sqrt(q_BxNxH.shape[-1]), jnp.finfo(jnp.float32).min)
        weights_BxNxT = jax.nn.softmax(scores_BxNxT, -1).astype(q_BxNxH.dtype)
        y_BxNxH = jnp.einsum("bnt,btnh->bnh", weights_BxNxT, values_BxTxNxH)
        return self._out(y_BxNxH[:, None])[:, 0], cache

    def _qkv(self, x_BxLxD):
        """q, k, v [B, L, N, H] of the inputs: the per-head projections and their biases."""
        cfg, dt = self.cfg, x_BxLxD.dtype
        qkv_bias_3xNxH = self.qkv_bias[...].reshape(3, cfg.n_heads, cfg.head_dim)
        qkv_3xBxLxNxH = jnp.einsum("bld,kndh->kblnh", x_BxLxD, self.qkv_kernel[...].astype(dt))
        return qkv_3xBxLxNxH + qkv_bias_3xNxH[:, None, None].astype(dt)

    def _out(self, y_BxLxNxH):
        """The heads' outputs [B, L, N, H] projected back to [B, L, D]."""
        dt = y_BxLxNxH.dtype
        return jnp.einsum("blnh,nhd->bld", y_BxLxNxH, self.out_kernel[...].astype(dt)) + self.out_bias[...].astype(dt)


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.mlp_ratio * cfg.d_model
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.fc_kernel = _param(rngs, (D, F), ("embed", "mlp"), cfg.init_std)
        self.fc_bias = _param(rngs, (F,), ("mlp",), None)
        self.proj_kernel = _param(rngs, (F, D), ("mlp", "embed"), resid_std)
        self.proj_bias = _param(rngs, (D,), ("norm",), None)
        self.cfg = cfg

    def __call__(self, x_BxLxD, dropout_key=None):
        dt = x_BxLxD.dtype
        h_BxLxF = x_BxLxD @ self.fc_kernel[...].astype(dt) + self.fc_bias[...].astype(dt)
        h_BxLxF = constrain(jax.nn.gelu(h_BxLxF, approximate=True), ("batch", "length", "act_mlp"))
        y_BxLxD = h_BxLxF @ self.proj_kernel[...].astype(dt) + self.proj_bias[...].astype(dt)
        return _dropout(y_BxLxD, self.cfg.dropout, dropout_key)


class Block(nnx.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.ln1 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.attn = Attention(cfg, rngs)
        self.ln2 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = MLP(cfg, rngs)

    def decode(self, x_BxD, position, cache, layer: int):
        """The block at one new position, attending over the cache (``Attention.decode``)."""
        y_BxD, cache = self.attn.decode(self.ln1(x_BxD), position, cache, layer)
        x_BxD = x_BxD + y_BxD
        return x_BxD + self.mlp(self.ln2(x_BxD)), cache

    def __call__(self, x_BxLxD, segment_ids_BxL, dropout_key=None):
        k1, k2 = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        x_BxLxD = x_BxLxD + self.attn(self.ln1(x_BxLxD), segment_ids_BxL, k1)
        x_BxLxD = x_BxLxD + self.mlp(self.ln2(x_BxLxD), k2)
        return constrain(x_BxLxD, ("batch", "length", "act_embed"))


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.token_embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        self.pos_embed = _param(rngs, (cfg.ctx, cfg.d_model), ("position", "embed"), cfg.init_std / 2)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.ln_f = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.cfg = cfg

    def __call__(self, tokens_BxL, segment_ids_BxL=None, dropout_key=None):
        """Float32 logits [B, L, V] of the next token at every position."""
        return self.logits(self.hidden(tokens_BxL, segment_ids_BxL, dropout_key))

    def logits(self, x_BxLxD):
        """Float32 logits [B, L, V] of final hidden states [B, L, D]: the tied head, ``x @ token_embed^T``."""
        dt = jnp.dtype(self.cfg.compute_dtype)
        logits_BxLxV = jnp.einsum("bld,vd->blv", x_BxLxD, self.token_embed[...].astype(dt))
        return constrain(logits_BxLxV, ("batch", "length", "act_vocab")).astype(jnp.float32)

    def empty_cache(self, batch: int, length: int):
        """Zero key and value caches for ``length`` positions: two [n_layers, B, T, N, H] arrays."""
        cfg = self.cfg
        shape = (cfg.n_layers, batch, length, cfg.n_heads, cfg.head_dim)
        return jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype)

    def decode(self, tokens_B, position, cache):
        """Next-token logits [B, V] after ``tokens_B`` at ``position``, attending over the cached positions
        before it (a KV cache, ``empty_cache``), and the updated cache: the model's forward pass one position at
        a time, each position's keys and values computed once."""
        dt = jnp.dtype(self.cfg.compute_dtype)
        x_BxD = (self.token_embed[...][tokens_B] + self.pos_embed[...][position]).astype(dt)
        for layer, block in enumerate(self.blocks):
            x_BxD, cache = block.decode(x_BxD, position, cache, layer)
        return self.logits(self.ln_f(x_BxD)[:, None])[:, 0], cache

    def hidden(self, tokens_BxL, segment_ids_BxL=None, dropout_key=None):
        """The final hidden states [B, L, D] (after the last LayerNorm), in the compute dtype."""
        cfg = self.cfg
        B, L = tokens_BxL.shape
        if L > cfg.ctx:
            raise ValueError(f"sequence length {L} exceeds the model context {cfg.ctx}")
        dt = jnp.dtype(cfg.compute_dtype)
        # Gather the tables over fsdp first (as FSDP does for every weight) so the lookup's gradient, a
        # scatter-add of batch-sharded rows, needs no resharding of the activations.
        table_VxD = constrain(self.token_embed[...], ("vocab", None))
        pos_LxD = constrain(self.pos_embed[...][:L], (None, None))
        x_BxLxD = (table_VxD[tokens_BxL] + pos_LxD).astype(dt)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
        segment_ids_BxL = segment_ids_BxL if cfg.document_mask else None
        keys = [None] * cfg.n_layers if dropout_key is None else jax.random.split(dropout_key, cfg.n_layers)
        policy = REMAT_POLICIES[cfg.remat]
        for block, key in zip(self.blocks, keys):
            if cfg.remat == "none":
                x_BxLxD = block(x_BxLxD, segment_ids_BxL, key)
            else:
                x_BxLxD = nnx.remat(lambda blk, *args: blk(*args), policy=policy)(block, x_BxLxD, segment_ids_BxL, key)
        return self.ln_f(x_BxLxD)
