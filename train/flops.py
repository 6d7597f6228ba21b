"""Model FLOPs per token and the peak FLOP/s that MFU is measured against."""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """An accelerator chip from its datasheet: memory and dense bfloat16 peak FLOP/s, per chip."""
    name: str  # as given on the command line (tools.plan --topology v5p:... / --gpu h100)
    device_kinds: tuple[str, ...]  # jax's device_kind of the chip (TPU: exact; GPU: contained in it)
    hbm_bytes: float
    peak_flops: float


CHIPS = {c.name: c for c in (
    Chip("v4", ("TPU v4",), 32 * GiB, 275e12),
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 16 * GiB, 197e12),
    Chip("v5p", ("TPU v5", "TPU v5p"), 95 * GiB, 459e12),
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 32 * GiB, 918e12),
    Chip("a100", ("A100",), 80 * GiB, 312e12),
    Chip("h100", ("H100",), 80 * GiB, 989e12),
    Chip("h200", ("H200",), 141e9, 989e12),
)}
TPU_CHIPS = ("v4", "v5e", "v5p", "v6e")
GPU_CHIPS = ("a100", "h100", "h200")


def chip_of(device_kind: str) -> Chip | None:
    """The chip whose device kind this is (TPU kinds match exactly, GPU names are contained), or None."""
    for chip in CHIPS.values():
        if device_kind in chip.device_kinds or (device_kind.startswith("NVIDIA")
                                                and any(k in device_kind for k in chip.device_kinds)):
            return chip
    return None


def flops_per_token(n_params: int, lookup_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (N - lookup_params) + 12 * n_layers * d_model * seq_len.

    6N counts forward+backward of every matmul weight; tables only looked up are excluded (``lookup_params``:
    GPT-2's position table, whose tied token embedding counts once, as the output head; the input embedding of
    the untied families); the second term is attention's QK^T and AV (PaLM appendix B). Rematerialisation is
    not counted: this is *model* FLOPs.
    """
    return 6.0 * (n_params - lookup_params) + attention_flops_per_token(n_layers, d_model, seq_len)


def lookup_params(model_cfg) -> int:
    """Parameters of a model that are looked up, not multiplied: the position table (learned positions) and,
    with untied embeddings, the token table."""
    m = model_cfg
    return (m.ctx * m.d_model if m.positions == "learned" else 0) + (0 if m.traits.tied else m.vocab_size * m.d_model)


def attention_flops_per_token(n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token of attention's QK^T and AV: 12 * n_layers * d_model * seq_len (forward 4LD per
    layer, backward twice that; the causal half is not subtracted, as in PaLM's MFU)."""
    return 12.0 * n_layers * d_model * seq_len


def datasheet_peak(device) -> float | None:
    """Peak FLOP/s of one accelerator chip from the table, or None (CPU, unknown chips)."""
    chip = chip_of(getattr(device, "device_kind", ""))
    return chip.peak_flops if chip else None


def measure_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5, device=None) -> float:
    """Achieved FLOP/s of an n x n x n matmul on one device (best of ``repeats``)."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def peak_flops(devices) -> tuple[float, str]:
    """(peak FLOP/s of all given devices together, where the number comes from).

    Accelerators use the datasheet table; CPU devices (simulated ones share the host's cores) use one
    measured float32 matmul on the host.
    """
    peak = datasheet_peak(devices[0])
    if peak is not None:
        return peak * len(devices), "datasheet bf16"
    return measure_matmul_flops(), "measured f32 matmul (host)"
