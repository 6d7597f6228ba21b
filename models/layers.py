"""The small pieces the model families are built from: parameters with logical axes, norms, rotary positions,
dropout. Norms and rotations compute in float32 and return the input's dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape, axes, std: float | None) -> nnx.Param:
    """A float32 parameter with logical axis names: N(0, std^2) init, or zeros when std is None."""
    value = jnp.zeros(shape, jnp.float32) if std is None else std * jax.random.normal(rngs.params(), shape)
    return nnx.Param(value, axes=axes)


class LayerNorm(nnx.Module):
    """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis."""

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


def rms_norm(x, eps: float):
    """y = x / sqrt(mean(x^2) + eps) over the last axis (no learned scale)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale over the last axis; ``scale=False``: without the learned scale
    (then the module has no parameters)."""

    def __init__(self, d: int, eps: float, scale: bool = True):
        self.scale = nnx.Param(jnp.ones((d,), jnp.float32), axes=("norm",)) if scale else None
        self.eps = eps

    def __call__(self, x):
        y = rms_norm(x, self.eps)
        return y if self.scale is None else (y.astype(jnp.float32) * self.scale[...]).astype(x.dtype)


def rotate(x_BxLxNxH, positions_L, base: float):
    """Rotary position embedding (RoPE, the rotate-half layout): the head dims are H/2 pairs (i, i + H/2), pair i
    rotated by the angle ``position * base^(-2i/H)``:

        y[..., i]       = x[..., i] cos(a_i) - x[..., i + H/2] sin(a_i)
        y[..., i + H/2] = x[..., i + H/2] cos(a_i) + x[..., i] sin(a_i)

    so that q . k after rotation depends on the positions only through their difference."""
    H = x_BxLxNxH.shape[-1]
    inverse_freq = base ** (-jnp.arange(0, H // 2, dtype=jnp.float32) * 2 / H)
    angles_LxH2 = positions_L.astype(jnp.float32)[:, None] * inverse_freq[None]
    cos, sin = (f(angles_LxH2)[None, :, None, :] for f in (jnp.cos, jnp.sin))
    x32 = x_BxLxNxH.astype(jnp.float32)
    first, second = x32[..., :H // 2], x32[..., H // 2:]
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1).astype(x_BxLxNxH.dtype)


def dropout(x, rate: float, key):
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
