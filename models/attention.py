"""Causal self-attention within documents, computed by one of several kernels.

For queries, keys and values q, k, v of shape [B, L, N, H] and segment ids s of shape [B, L] (the document
of every token of a packed row):

    y[b, i, n] = sum_j p[b, n, i, j] v[b, j, n],   p[b, n, i, :] = softmax_j(q[b, i, n] . k[b, j, n] / sqrt(H))

where the softmax runs over the allowed keys j only: j <= i and s[b, j] == s[b, i] (a token sees the earlier
tokens of its own document). Without segment ids the condition is j <= i alone.

Implementations (``IMPLS``); all give the same result up to floating-point rounding:

* ``xla``: the formula above in two einsums, ``scores = einsum(q, k) / sqrt(H)`` ([B, N, L, L], float32),
  disallowed keys set to the float32 minimum, softmax, ``einsum(p, v)``. Any platform; materialises the
  scores. Written here rather than taken from ``jax.nn.dot_product_attention``, which computes the same
  values (tested) through a grouped-query [B, L, K, G, H] reshape with G = 1 and a mask broadcast to five
  dims: on this CPU, forward and backward at cpu-small's shapes took 85.5 ms against 68.6 ms here, and
  the cpu-small train step about 6% longer (train/BENCHMARKS.md).
* ``splash``: TPU splash attention (Pallas): blockwise online softmax that skips the blocks above the diagonal
  and compares segment ids inside the kernel. Block size: the largest of 512, 256, 128 that divides L (512 is
  the usual TPU choice; the kernel needs multiples of 128). Needs L a multiple of 128.
* ``pallas_gpu``: the Pallas (Triton) flash attention of ``jax.experimental.pallas.ops.gpu.attention``, with
  the kernel's default tiles (128 x 128 forward, 32 x 32 backward, sized for a GPU's registers and shared
  memory). It takes per-token segment ids, so it is the GPU kernel for document masking. Needs L a multiple
  of 128.
* ``cudnn``: cuDNN flash attention (``jax.nn.dot_product_attention(..., implementation="cudnn")``), causal
  only: its interface describes padding (per-row sequence lengths), not documents (per-token segment ids),
  so it cannot mask documents; and it takes bfloat16/float16 inputs only.

Pallas kernels cannot be partitioned by GSPMD, so under a mesh they run inside ``jax.shard_map``: batch over
the mesh axes of the logical "batch" axis, heads over those of "act_heads" (``models.partitioning.RULES``),
whole sequences on every device. Attention is independent per (example, head): no communication is needed.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from models.partitioning import logical_to_spec

IMPLS = ("xla", "splash", "pallas_gpu", "cudnn")
KERNEL_PLATFORMS = {"xla": ("cpu", "gpu", "tpu"), "splash": ("tpu",), "pallas_gpu": ("gpu",), "cudnn": ("gpu",)}
FUSED_BLOCK = 128  # the fused kernels' sequence lengths must be multiples of this
SPLASH_BLOCKS = (512, 256, 128)  # splash block sizes by preference; the first that divides L is used

CUDNN_NO_DOCUMENTS = (
    "attention='cudnn' cannot mask documents: cuDNN's fused attention takes a causal mask and per-row sequence "
    "lengths, not per-token segment ids. Set model.document_mask=False (attention crosses document boundaries, "
    "as GPT-2/3 trained) or use model.attention='pallas_gpu'")


def resolve_attention(impl: str, platform: str, document_mask: bool, compute_dtype: str) -> str:
    """The implementation ``impl`` names on ``platform`` ("cpu", "gpu", "tpu"): "auto" becomes splash on TPU;
    on GPU cuDNN when it can run this model (no document mask, bfloat16), else pallas_gpu; xla elsewhere.
    Other names are returned unchanged, or refused with the kernels that do run there (``KERNEL_PLATFORMS``)."""
    if impl != "auto":
        if platform not in KERNEL_PLATFORMS.get(impl, (platform,)):
            runs = [k for k, platforms in KERNEL_PLATFORMS.items() if platform in platforms]
            raise ValueError(f"model.attention={impl!r} runs on {'/'.join(KERNEL_PLATFORMS[impl]).upper()} only; "
                             f"on {platform.upper()} use {' or '.join(runs)} (or auto, which picks by platform)")
        return impl
    if platform == "tpu":
        return "splash"
    if platform == "gpu":
        return "cudnn" if not document_mask and compute_dtype == "bfloat16" else "pallas_gpu"
    return "xla"


def check_attention_length(impl: str, seq_len: int) -> None:
    """The fused kernels tile the sequence in blocks of ``FUSED_BLOCK`` tokens: refuse other lengths."""
    if impl in ("splash", "pallas_gpu") and seq_len % FUSED_BLOCK:
        raise ValueError(f"attention={impl!r} needs a sequence length that is a multiple of {FUSED_BLOCK} (its "
                         f"kernel's blocks), got {seq_len}: change seq_len or use model.attention='xla'")


def _causal(L: int):
    """[L, L] booleans: key j is allowed for query i when j <= i."""
    return jnp.tril(jnp.ones((L, L), bool))


def attention_mask(segment_ids_BxL):
    """Causal mask restricted to tokens of the same document: [B, 1, L, L] booleans."""
    L = segment_ids_BxL.shape[1]
    causal_LxL = _causal(L)
    same_doc_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    return (causal_LxL & same_doc_BxLxL)[:, None]


def _xla(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL):
    """The module docstring's formula with the [B, N, L, L] scores in float32; the output in q's dtype.

    q, k and v are brought to [B, N, L, H] first, so that every batched product runs over contiguous
    per-(example, head) matrices (on this CPU 20% faster than contracting in the [B, L, N, H] layout)."""
    L, H = q_BxLxNxH.shape[1], q_BxLxNxH.shape[3]
    q_BxNxLxH, k_BxNxLxH, v_BxNxLxH = (jnp.swapaxes(x, 1, 2) for x in (q_BxLxNxH, k_BxLxNxH, v_BxLxNxH))
    scores_BxNxLxL = jnp.einsum("bnlh,bnmh->bnlm", q_BxNxLxH, k_BxNxLxH,
                                preferred_element_type=jnp.float32) / math.sqrt(H)
    allowed = _causal(L)[None, None] if segment_ids_BxL is None else attention_mask(segment_ids_BxL)
    scores_BxNxLxL = jnp.where(allowed, scores_BxNxLxL, jnp.finfo(jnp.float32).min)
    p_BxNxLxL = jax.nn.softmax(scores_BxNxLxL, axis=-1).astype(v_BxLxNxH.dtype)
    return jnp.swapaxes(jnp.einsum("bnlm,bnmh->bnlh", p_BxNxLxL, v_BxNxLxH), 1, 2)


def attend(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL=None, *, impl: str, interpret: bool = False):
    """Causal attention within documents (module docstring) by ``impl``: [B, L, N, H] -> [B, L, N, H].

    ``segment_ids_BxL``: the document id of every token, or None for plain causal attention.
    ``interpret``: run a Pallas kernel in interpret mode (tests on CPU).
    """
    if impl == "xla":
        return _xla(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL)
    if impl == "cudnn":
        if segment_ids_BxL is not None:
            raise ValueError(CUDNN_NO_DOCUMENTS)
        return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, is_causal=True,
                                            implementation="cudnn")
    kernels = {"splash": _splash, "pallas_gpu": _pallas_gpu}
    if impl not in kernels:
        raise ValueError(f"unknown attention implementation {impl!r}; valid: {', '.join(IMPLS)}")
    check_attention_length(impl, q_BxLxNxH.shape[1])
    return _per_shard(kernels[impl], interpret, q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL)


def _per_shard(kernel, interpret: bool, q, k, v, segment_ids):
    """``kernel(q, k, v, segment_ids, interpret)`` on each device's rows and heads under the current mesh
    (directly when there is none). Sequences stay whole: the kernels need every key of a row.

    ``check_vma=False``: the Pallas kernels' outputs do not declare how they vary over the mesh axes, which
    that check needs. The gradients stay exact: q, k, v and the output have the same spec, so the transpose's
    scaling for axes a spec leaves out (the output cotangent divided, the inputs' summed) cancels.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, segment_ids, interpret)
    qkv_spec = logical_to_spec(("batch", None, "act_heads", None))
    if segment_ids is None:
        return jax.shard_map(lambda q, k, v: kernel(q, k, v, None, interpret), mesh=mesh, check_vma=False,
                             in_specs=(qkv_spec,) * 3, out_specs=qkv_spec)(q, k, v)
    return jax.shard_map(lambda q, k, v, s: kernel(q, k, v, s, interpret), mesh=mesh, check_vma=False,
                         in_specs=(qkv_spec,) * 3 + (logical_to_spec(("batch", None)),),
                         out_specs=qkv_spec)(q, k, v, segment_ids)


def _splash(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, interpret: bool):
    """Splash attention, one example at a time (the kernel takes [N, L, H]). It does not scale the scores:
    q is multiplied by 1/sqrt(H) first."""
    _, L, N, H = q_BxLxNxH.shape
    block = next(b for b in SPLASH_BLOCKS if L % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    causal = splash_mask.MultiHeadMask([splash_mask.CausalMask((L, L)) for _ in range(N)])
    kernel = splash.make_splash_mha(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    q_BxLxNxH = q_BxLxNxH * jnp.asarray(1 / math.sqrt(H), q_BxLxNxH.dtype)

    def one(q_LxNxH, k_LxNxH, v_LxNxH, segment_ids_L):
        ids = None if segment_ids_L is None else splash.SegmentIds(q=segment_ids_L, kv=segment_ids_L)
        y_NxLxH = kernel(q_LxNxH.swapaxes(0, 1), k_LxNxH.swapaxes(0, 1), v_LxNxH.swapaxes(0, 1), segment_ids=ids)
        return y_NxLxH.swapaxes(0, 1)

    return jax.vmap(one)(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL)


def _pallas_gpu(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, interpret: bool):
    """The Pallas GPU flash attention (it takes [B, L, N, H] and scales the scores by ``sm_scale``)."""
    H = q_BxLxNxH.shape[-1]
    return gpu_attention.mha(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, segment_ids_BxL, sm_scale=1 / math.sqrt(H),
                             causal=True, interpret=interpret)
