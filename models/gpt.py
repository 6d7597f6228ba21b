"""Decoder-only transformers in flax NNX: GPT-2 / GPT-3 and two current families, selected by ``family``.

Every family stacks pre-norm blocks, x + Attn(Norm(x)), then x + MLP(Norm(x)), and keeps the attention
kernels per head, the heads as a leading (batch) axis:

    qkv kernel  [3, N, D, H]   (q/k/v, heads, d_model, head_dim); with grouped-query attention (K < N key/value
                               heads) q kernel [N, D, H] and kv kernel [2, K, D, H] instead
    out kernel  [N, H, D]

so that matrix-aware optimizers (Celo2, Muon) see per-head D x H matrices and tensor parallelism splits the
head axis N. Biases and norm scales are vectors, so "ndim <= 1" identifies exactly the non-matrix parameters;
embeddings (``token_embed``, ``pos_embed``, ``unembed``) carry "embed" in their names.

Families (``FAMILIES``):

* ``gpt2``: LayerNorm (scale and bias), learned absolute positions, biases everywhere, the output head tied to
  the token embedding, MLP ``proj(gelu_tanh(fc x))`` of width 4D. GPT-2 and GPT-3 (dense).
* ``modern``: the Celo2 paper's pretraining architecture: RMSNorm without a learned scale, q and k
  RMS-normalised per head (QK-norm, no scale) then rotated (RoPE), no biases, untied input and output
  embeddings, the same GELU MLP of width 4D.
* ``llama``: RMSNorm with a learned scale, RoPE, no biases, untied embeddings, SwiGLU MLP
  ``proj(silu(gate x) * up x)`` of width 8D/3 rounded up to a multiple of 128 (``mlp_width`` sets it), optional
  grouped-query attention (``n_kv_heads``).

Shapes in names: B batch, L sequence, D d_model, N heads, K key/value heads, H head_dim, F mlp width, V vocab.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import CUDNN_NO_DOCUMENTS, IMPLS, attend
from models.layers import LayerNorm, RMSNorm, dropout, param, rms_norm, rotate
from models.partitioning import constrain


@dataclasses.dataclass(frozen=True)
class Family:
    """What distinguishes an architecture family."""
    norm: str  # "layernorm" (scale and bias) | "rmsnorm" (scale) | "rmsnorm_plain" (no parameters)
    positions: str  # "learned" (a table added to the input) | "rotary" (q and k rotated, models.layers.rotate)
    biases: bool  # in every projection
    tied: bool  # the output head is the token embedding's transpose
    qk_norm: bool  # q and k RMS-normalised over the head dim (no scale) before the rotation
    mlp: str  # "gelu": proj(gelu_tanh(fc x)) | "swiglu": proj(silu(gate x) * up x)


FAMILIES = {
    "gpt2": Family("layernorm", "learned", biases=True, tied=True, qk_norm=False, mlp="gelu"),
    "modern": Family("rmsnorm_plain", "rotary", biases=False, tied=False, qk_norm=True, mlp="gelu"),
    "llama": Family("rmsnorm", "rotary", biases=False, tied=False, qk_norm=False, mlp="swiglu"),
}
SWIGLU_MULTIPLE = 128  # the SwiGLU width's default is rounded up to a multiple of this

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
    family: str = "gpt2"  # one of FAMILIES
    n_kv_heads: int = 0  # key/value heads (grouped-query attention when fewer than n_heads); 0: n_heads
    mlp_width: int = 0  # 0: 4D (gelu), or 8D/3 rounded up to a multiple of SWIGLU_MULTIPLE (swiglu)
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model.family={self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_kv_heads < 0 or self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} "
                             "(0: as many as the heads)")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dim; d_model / n_heads = {self.head_dim}")
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

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def traits(self) -> Family:
        return FAMILIES[self.family]

    @property
    def positions(self) -> str:
        return self.traits.positions

    @property
    def mlp_hidden(self) -> int:
        """F, the MLP's hidden width."""
        if self.mlp_width:
            return self.mlp_width
        if self.traits.mlp == "swiglu":
            return math.ceil(2 * self.mlp_ratio * self.d_model / 3 / SWIGLU_MULTIPLE) * SWIGLU_MULTIPLE
        return self.mlp_ratio * self.d_model


def make_norm(cfg: GPTConfig):
    """The family's norm over d_model."""
    kind = cfg.traits.norm
    if kind == "layernorm":
        return LayerNorm(cfg.d_model, cfg.ln_eps)
    return RMSNorm(cfg.d_model, cfg.ln_eps, scale=kind == "rmsnorm")


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        biases = cfg.traits.biases
        if K == N:
            self.qkv_kernel = param(rngs, (3, N, D, H), ("qkv", "heads", "embed", "head_dim"), cfg.init_std)
            self.qkv_bias = param(rngs, (3 * N * H,), ("norm",), None) if biases else None
        else:
            self.q_kernel = param(rngs, (N, D, H), ("heads", "embed", "head_dim"), cfg.init_std)
            self.kv_kernel = param(rngs, (2, K, D, H), ("qkv", "kv_heads", "embed", "head_dim"), cfg.init_std)
            self.q_bias = param(rngs, (N * H,), ("norm",), None) if biases else None
            self.kv_bias = param(rngs, (2 * K * H,), ("norm",), None) if biases else None
        self.out_kernel = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), resid_std)
        self.out_bias = param(rngs, (D,), ("norm",), None) if biases else None
        self.cfg = cfg

    def __call__(self, x_BxLxD, segment_ids_BxL, dropout_key=None):
        """Causal self-attention, within documents when ``segment_ids_BxL`` is given (``models.attention``)."""
        q, k, v = self._qkv(x_BxLxD, jnp.arange(x_BxLxD.shape[1]))
        q, k, v = (constrain(t, ("batch", "length", "act_heads", None)) for t in (q, self._grouped(k), self._grouped(v)))
        y_BxLxNxH = attend(q, k, v, segment_ids_BxL, impl=self.cfg.attention)
        return dropout(self._out(y_BxLxNxH), self.cfg.dropout, dropout_key)

    def decode(self, x_BxD, position, cache, layer: int):
        """One new position's attention over the cached keys and values of positions 0 .. ``position``: its
        own are written first into ``cache`` (keys, values [n_layers, B, T, K, H], at ``layer``, in place).
        Returns (y [B, D], the updated cache). One document: no segments."""
        q_BxNxH, k_BxKxH, v_BxKxH = (t[:, 0] for t in self._qkv(x_BxD[:, None], jnp.reshape(position, (1,))))
        cache = tuple(jax.lax.dynamic_update_slice(c, new[None, :, None].astype(c.dtype), (layer, 0, position, 0, 0))
                      for c, new in zip(cache, (k_BxKxH, v_BxKxH)))
        keys_BxTxNxH, values_BxTxNxH = self._grouped(cache[0][layer]), self._grouped(cache[1][layer])
        scores_BxNxT = jnp.einsum("bnh,btnh->bnt", q_BxNxH, keys_BxTxNxH).astype(jnp.float32)
        scores_BxNxT = jnp.where(jnp.arange(keys_BxTxNxH.shape[1]) <= position,
                                 scores_BxNxT / math.sqrt(q_BxNxH.shape[-1]), jnp.finfo(jnp.float32).min)
        weights_BxNxT = jax.nn.softmax(scores_BxNxT, -1).astype(q_BxNxH.dtype)
        y_BxNxH = jnp.einsum("bnt,btnh->bnh", weights_BxNxT, values_BxTxNxH)
        return self._out(y_BxNxH[:, None])[:, 0], cache

    def _grouped(self, t_BxLxKxH):
        """Keys or values of the K key/value heads repeated for the N query heads (head n reads kv head n // (N/K))."""
        groups = self.cfg.n_heads // self.cfg.kv_heads
        return t_BxLxKxH if groups == 1 else jnp.repeat(t_BxLxKxH, groups, axis=2)

    def _qkv(self, x_BxLxD, positions_L):
        """q [B, L, N, H] and k, v [B, L, K, H] of the inputs at ``positions_L``: the per-head projections and
        biases, then (by family) QK-norm and the rotary rotation of q and k."""
        cfg, dt = self.cfg, x_BxLxD.dtype
        N, K, H = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        if K == N:
            q, k, v = jnp.einsum("bld,kndh->kblnh", x_BxLxD, self.qkv_kernel[...].astype(dt))
            biases = None if self.qkv_bias is None else self.qkv_bias[...].reshape(3, N, H)
        else:
            q = jnp.einsum("bld,ndh->blnh", x_BxLxD, self.q_kernel[...].astype(dt))
            k, v = jnp.einsum("bld,kndh->kblnh", x_BxLxD, self.kv_kernel[...].astype(dt))
            biases = None if self.q_bias is None else (self.q_bias[...].reshape(N, H),
                                                       *self.kv_bias[...].reshape(2, K, H))
        if biases is not None:
            q, k, v = (t + b.astype(dt) for t, b in zip((q, k, v), biases))
        if cfg.traits.qk_norm:
            q, k = rms_norm(q, cfg.ln_eps), rms_norm(k, cfg.ln_eps)
        if cfg.positions == "rotary":
            q, k = rotate(q, positions_L, cfg.rope_base), rotate(k, positions_L, cfg.rope_base)
        return q, k, v

    def _out(self, y_BxLxNxH):
        """The heads' outputs [B, L, N, H] projected back to [B, L, D]."""
        dt = y_BxLxNxH.dtype
        y_BxLxD = jnp.einsum("blnh,nhd->bld", y_BxLxNxH, self.out_kernel[...].astype(dt))
        return y_BxLxD if self.out_bias is None else y_BxLxD + self.out_bias[...].astype(dt)


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.mlp_hidden
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        biases = cfg.traits.biases
        if cfg.traits.mlp == "swiglu":
            self.gate_kernel = param(rngs, (D, F), ("embed", "mlp"), cfg.init_std)
            self.up_kernel = param(rngs, (D, F), ("embed", "mlp"), cfg.init_std)
        else:
            self.fc_kernel = param(rngs, (D, F), ("embed", "mlp"), cfg.init_std)
            self.fc_bias = param(rngs, (F,), ("mlp",), None) if biases else None
        self.proj_kernel = param(rngs, (F, D), ("mlp", "embed"), resid_std)
        self.proj_bias = param(rngs, (D,), ("norm",), None) if biases else None
        self.cfg = cfg

    def __call__(self, x_BxLxD, dropout_key=None):
        dt = x_BxLxD.dtype
        if self.cfg.traits.mlp == "swiglu":
            h_BxLxF = jax.nn.silu(x_BxLxD @ self.gate_kernel[...].astype(dt)) * (x_BxLxD @ self.up_kernel[...].astype(dt))
        else:
            h_BxLxF = x_BxLxD @ self.fc_kernel[...].astype(dt)
            h_BxLxF = jax.nn.gelu(h_BxLxF if self.fc_bias is None else h_BxLxF + self.fc_bias[...].astype(dt),
                                  approximate=True)
        h_BxLxF = constrain(h_BxLxF, ("batch", "length", "act_mlp"))
        y_BxLxD = h_BxLxF @ self.proj_kernel[...].astype(dt)
        y_BxLxD = y_BxLxD if self.proj_bias is None else y_BxLxD + self.proj_bias[...].astype(dt)
        return dropout(y_BxLxD, self.cfg.dropout, dropout_key)


class Block(nnx.Module):
    """x + Attn(Norm(x)), then x + MLP(Norm(x))."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, rngs)
        self.ln2 = make_norm(cfg)
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
        self.token_embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std)
        if cfg.positions == "learned":
            self.pos_embed = param(rngs, (cfg.ctx, cfg.d_model), ("position", "embed"), cfg.init_std / 2)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.ln_f = make_norm(cfg)
        if not cfg.traits.tied:
            self.unembed = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std)
        self.cfg = cfg

    def __call__(self, tokens_BxL, segment_ids_BxL=None, dropout_key=None):
        """Float32 logits [B, L, V] of the next token at every position."""
        return self.logits(self.hidden(tokens_BxL, segment_ids_BxL, dropout_key))

    def logits(self, x_BxLxD):
        """Float32 logits [B, L, V] of final hidden states [B, L, D]: ``x @ unembed``, or with tied embeddings
        ``x @ token_embed^T``."""
        dt = jnp.dtype(self.cfg.compute_dtype)
        if self.cfg.traits.tied:
            logits_BxLxV = jnp.einsum("bld,vd->blv", x_BxLxD, self.token_embed[...].astype(dt))
        else:
            logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, self.unembed[...].astype(dt))
        return constrain(logits_BxLxV, ("batch", "length", "act_vocab")).astype(jnp.float32)

    def empty_cache(self, batch: int, length: int):
        """Zero key and value caches for ``length`` positions: two [n_layers, B, T, K, H] arrays."""
        cfg = self.cfg
        shape = (cfg.n_layers, batch, length, cfg.kv_heads, cfg.head_dim)
        return jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype)

    def decode(self, tokens_B, position, cache):
        """Next-token logits [B, V] after ``tokens_B`` at ``position``, attending over the cached positions
        before it (a KV cache, ``empty_cache``), and the updated cache: the model's forward pass one position at
        a time, each position's keys and values computed once."""
        dt = jnp.dtype(self.cfg.compute_dtype)
        x_BxD = self.token_embed[...][tokens_B]
        if self.cfg.positions == "learned":
            x_BxD = x_BxD + self.pos_embed[...][position]
        x_BxD = x_BxD.astype(dt)
        for layer, block in enumerate(self.blocks):
            x_BxD, cache = block.decode(x_BxD, position, cache, layer)
        return self.logits(self.ln_f(x_BxD)[:, None])[:, 0], cache

    def hidden(self, tokens_BxL, segment_ids_BxL=None, dropout_key=None):
        """The final hidden states [B, L, D] (after the last norm), in the compute dtype."""
        cfg = self.cfg
        B, L = tokens_BxL.shape
        if L > cfg.ctx:
            raise ValueError(f"sequence length {L} exceeds the model context {cfg.ctx}")
        dt = jnp.dtype(cfg.compute_dtype)
        # Gather the tables over fsdp first (as FSDP does for every weight) so the lookup's gradient, a
        # scatter-add of batch-sharded rows, needs no resharding of the activations.
        table_VxD = constrain(self.token_embed[...], ("vocab", None))
        x_BxLxD = table_VxD[tokens_BxL]
        if cfg.positions == "learned":
            x_BxLxD = x_BxLxD + constrain(self.pos_embed[...][:L], (None, None))
        x_BxLxD = constrain(x_BxLxD.astype(dt), ("batch", "length", "act_embed"))
        segment_ids_BxL = segment_ids_BxL if cfg.document_mask else None
        keys = [None] * cfg.n_layers if dropout_key is None else jax.random.split(dropout_key, cfg.n_layers)
        policy = REMAT_POLICIES[cfg.remat]
        for block, key in zip(self.blocks, keys):
            if cfg.remat == "none":
                x_BxLxD = block(x_BxLxD, segment_ids_BxL, key)
            else:
                x_BxLxD = nnx.remat(lambda blk, *args: blk(*args), policy=policy)(block, x_BxLxD, segment_ids_BxL, key)
        return self.ln_f(x_BxLxD)
