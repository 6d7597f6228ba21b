"""The matmuls of a GPT train step, each timed on its own: how fast the step could be if nothing else cost time.

For batch B x L tokens (T = B L), d_model D, N heads of H = D / N, MLP width F = 4D, vocabulary V, per layer:

    qkv  [T, D] x [D, 3D]    out  [T, D] x [D, D]    mlp_in  [T, D] x [D, F]    mlp_out  [T, F] x [F, D]

each with its two backward products (dx = dy W^T, dW = x^T dy), and attention's six batched products over the
B N (example, head) pairs, with the whole [L, L] score matrix as ``xla`` attention computes it:

    scores q k^T  [L, H] x [H, L]     p v  [L, L] x [L, H]
    dp = dy v^T   [L, H] x [H, L]     dv = p^T dy, dq = ds k, dk = ds^T q   [L, L] x [L, H]

and once, the tied head [T, D] x [D, V] with its two backward products. Their FLOPs add up to the model
FLOPs of ``train.flops`` up to the LayerNorm and bias terms (6(N - L_ctx D) + 12 layers D L per token).

Each product is one jitted dot on random operands of its shape in the compute dtype, on one device, timed
alone (``tools.bench``: median of repeats after a warm-up call). The sum of their times is the step's *matmul time*: the step cannot be faster with these kernels, and
``model FLOPs / matmul time / best matmul rate`` is the ceiling on MFU that they allow, before the softmax,
GELU, LayerNorm, cross-entropy and optimizer (memory-bound elementwise work) take any time at all.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Product:
    name: str
    batch: int  # independent matmuls of this shape per call (attention: B N)
    m: int
    k: int
    n: int
    count: int  # calls per train step (per layer: the number of layers)

    @property
    def flops(self) -> float:
        """Per train step."""
        return 2.0 * self.batch * self.m * self.k * self.n * self.count


def step_products(n_layers: int, d_model: int, n_heads: int, vocab: int, batch_size: int,
                  seq_len: int) -> list[Product]:
    """Every matmul of one forward + backward pass (module docstring)."""
    T, D, F, L, H = batch_size * seq_len, d_model, 4 * d_model, seq_len, d_model // n_heads
    products = []
    for name, d_in, d_out in (("qkv", D, 3 * D), ("out", D, D), ("mlp_in", D, F), ("mlp_out", F, D)):
        products += [Product(f"{name} x W", 1, T, d_in, d_out, n_layers),
                     Product(f"{name} dy W^T", 1, T, d_out, d_in, n_layers),
                     Product(f"{name} x^T dy", 1, d_in, T, d_out, n_layers)]
    BN = batch_size * n_heads
    products += [Product("attention q k^T", BN, L, H, L, n_layers), Product("attention p v", BN, L, L, H, n_layers),
                 Product("attention dy v^T", BN, L, H, L, n_layers),
                 Product("attention p^T dy", BN, L, L, H, n_layers),
                 Product("attention ds k", BN, L, L, H, n_layers), Product("attention ds^T q", BN, L, L, H, n_layers)]
    products += [Product("head x E^T", 1, T, D, vocab, 1), Product("head dy E", 1, T, vocab, D, 1),
                 Product("head dy^T x", 1, vocab, T, D, 1)]
    return products


def product_call(p: Product, dtype: str = "float32"):
    """A blocking zero-argument call of one product ``p`` on random operands of its shape and ``dtype``."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (p.batch, p.m, p.k) if p.batch > 1 else (p.m, p.k), dtype)
    b = jax.random.normal(jax.random.key(1), (p.batch, p.k, p.n) if p.batch > 1 else (p.k, p.n), dtype)
    dot = jax.jit(jnp.matmul)
    return lambda: dot(a, b).block_until_ready()
