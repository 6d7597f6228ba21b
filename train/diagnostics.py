"""Per-layer optimizer diagnostics (``--config.diagnostics_every=N``; off at 0).

Every N-th step the train step also reports, for each parameter group (``group_of``: the token and position
embeddings and the untied output layer, and per layer the attention's qkv (or q and kv) and output projections,
the MLP's input (fc, or gate and up) and output projections, each with its bias, and the two norms; the final
norm),

    grad_norm          ||G||                       the gradient before clipping
    param_norm         ||P||                       the parameters the update is applied to
    update_rms         ||U|| / sqrt(n)             U = the step's change of the parameters (lr included)
    update_ratio       ||U|| / ||P||
    update_cos         <U, U'> / (||U|| ||U'||)    U' = the update of the previous diagnostic step
    update_sigma_max   sigma_1(M)                  M = the group's matrix, the update of its kernel as
    update_stable_rank ||M||_F^2 / sigma_1(M)^2        [d_model, everything else] (several kernels side by
                                                   side); matrix groups only

with norms over all of a group's leaves (Frobenius). sigma_1 is estimated (for the layers' matrices of one
kind in one batch) by ``POWER_ITERATIONS`` power iterations on M^T M from a fixed start vector (it converges
from below; for an orthogonalised update, whose singular values are nearly equal, any start is close). The stable rank lies in [1, rank M]: near 1 when one
direction dominates the update (typical of AdamW's low-rank steps), near min(d_model, rest) when every
direction gets the same size (Muon's orthogonalised steps).

Everything is computed inside the jitted step on the sharded tensors, so a norm is the whole tensor's on any
mesh; the values are fetched with the step's other metrics. The rows are written as ``<metric>/<group>``
(``update_ratio/attn_qkv.03``): TensorBoard and W&B show each metric as a family of curves, one per group.
``update_cos`` needs the previous diagnostic step's update, which the trainer keeps on the devices (one more
copy of the parameters' size while diagnostics are on); the first diagnostic row after a start or resume has
none.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

POWER_ITERATIONS = 10
METRICS = ("grad_norm", "param_norm", "update_rms", "update_ratio", "update_cos", "update_sigma_max",
           "update_stable_rank")
KINDS = ("embed_token", "embed_pos", "embed_out", "attn_qkv", "attn_out", "mlp_in", "mlp_out", "norms",
         "final_norm")

# a leaf's name -> (its group's kind, the axis of d_model when it is the group's matrix, else None)
_LEAVES = {
    "token_embed": ("embed_token", 1), "pos_embed": ("embed_pos", 1), "unembed": ("embed_out", 0),
    "ln_f": ("final_norm", None),
    "qkv_kernel": ("attn_qkv", 2), "qkv_bias": ("attn_qkv", None),
    "q_kernel": ("attn_qkv", 1), "kv_kernel": ("attn_qkv", 2), "q_bias": ("attn_qkv", None),
    "kv_bias": ("attn_qkv", None),
    "gate_kernel": ("mlp_in", 0), "up_kernel": ("mlp_in", 0),
    "out_kernel": ("attn_out", 2), "out_bias": ("attn_out", None),
    "fc_kernel": ("mlp_in", 0), "fc_bias": ("mlp_in", None),
    "proj_kernel": ("mlp_out", 1), "proj_bias": ("mlp_out", None),
    "ln1": ("norms", None), "ln2": ("norms", None),
}


def is_diagnostic(key: str) -> bool:
    """Whether a metrics key is one of these diagnostics (``<metric>/<group>``)."""
    return key.split("/", 1)[0] in METRICS and "/" in key


def group_of(path) -> tuple[str, int | None]:
    """(group, d_model axis of the group's matrix or None) of a parameter at ``path`` (a jax key path):
    ``attn_qkv.03`` for layer 3's qkv kernel and bias, ``embed_token``, ``final_norm``."""
    names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    named = [n for n in names if n in _LEAVES]
    if not named:
        raise ValueError(f"parameter {'/'.join(names)} has no diagnostics group: add its name to "
                         f"train.diagnostics._LEAVES")
    kind, axis = _LEAVES[named[-1]]
    layer = next((int(names[i + 1]) for i, n in enumerate(names[:-1]) if n == "blocks"), None)
    return (kind if layer is None else f"{kind}.{layer:02d}"), axis


def _sigma_max(m):
    """sigma_1 of a matrix [a, b] by power iteration on the smaller of M^T M and M M^T."""
    m = m if m.shape[0] >= m.shape[1] else m.T
    v = jax.random.normal(jax.random.key(0), (m.shape[1],), m.dtype)

    def iterate(_, v):
        w = m.T @ (m @ v)
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(m.dtype).tiny)

    return jnp.linalg.norm(m @ jax.lax.fori_loop(0, POWER_ITERATIONS, iterate, v / jnp.linalg.norm(v)))


def parameter_diagnostics(params, grads, updates, previous) -> dict:
    """{``<metric>/<group>``: scalar} of one step (``params`` before it, ``previous`` the last diagnostic
    step's updates; ``update_cos`` is NaN when ``previous`` is all zeros: there was none)."""
    sums: dict[str, dict] = {}
    group_matrices: dict[str, list] = {}  # group -> its kernels' updates as [d_model, rest] matrices
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for (path, p), g, u, u_prev in zip(leaves, jax.tree.leaves(grads), jax.tree.leaves(updates),
                                       jax.tree.leaves(previous)):
        group, axis = group_of(path)
        s = sums.setdefault(group, dict(g=0.0, p=0.0, u=0.0, prev=0.0, dot=0.0, n=0))
        u, u_prev = u.astype(jnp.float32), u_prev.astype(jnp.float32)
        s["g"] += jnp.sum(jnp.square(g.astype(jnp.float32)))
        s["p"] += jnp.sum(jnp.square(p.astype(jnp.float32)))
        s["u"] += jnp.sum(jnp.square(u))
        s["prev"] += jnp.sum(jnp.square(u_prev))
        s["dot"] += jnp.sum(u * u_prev)
        s["n"] += p.size
        if axis is not None:
            group_matrices.setdefault(group, []).append(jnp.moveaxis(u, axis, 0).reshape(u.shape[axis], -1))
    matrices: dict[tuple, dict[str, jax.Array]] = {}  # (kind, shape) -> {group: its update as one matrix}
    for group, parts in group_matrices.items():  # a group of several kernels (q and kv; gate and up): side by side
        m = parts[0] if len(parts) == 1 else jnp.concatenate(parts, 1)
        matrices.setdefault((group.split(".")[0], m.shape), {})[group] = m
    out = {}
    for group, s in sums.items():
        u_norm = jnp.sqrt(s["u"])
        out[f"grad_norm/{group}"] = jnp.sqrt(s["g"])
        out[f"param_norm/{group}"] = jnp.sqrt(s["p"])
        out[f"update_rms/{group}"] = u_norm / jnp.sqrt(float(s["n"]))
        out[f"update_ratio/{group}"] = u_norm / jnp.sqrt(s["p"])
        out[f"update_cos/{group}"] = jnp.where(s["prev"] > 0, s["dot"] / (u_norm * jnp.sqrt(s["prev"])), jnp.nan)
    for same_shape in matrices.values():  # the layers' matrices of one kind in one batch: fewer collectives
        stacked = jnp.stack(list(same_shape.values()))
        sigma = jax.vmap(_sigma_max)(stacked)
        stable_rank = jnp.sum(jnp.square(stacked), axis=(1, 2)) / jnp.square(sigma)
        for i, group in enumerate(same_shape):
            out[f"update_sigma_max/{group}"] = sigma[i]
            out[f"update_stable_rank/{group}"] = stable_rank[i]
    return out
