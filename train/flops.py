"""Model FLOPs per token and the peak FLOP/s that MFU is measured against."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bfloat16 peak FLOP/s per chip (datasheets).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def flops_per_token(n_params: int, n_layers: int, d_model: int, ctx: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (N - ctx*D) + 12 * n_layers * d_model * seq_len.

    6N counts forward+backward of every matmul weight (the tied embedding counts once, as the output
    head; the position table is a lookup and is excluded); the second term is attention's QK^T and AV
    (PaLM appendix B). Rematerialisation is not counted: this is *model* FLOPs.
    """
    return 6.0 * (n_params - ctx * d_model) + 12.0 * n_layers * d_model * seq_len


def datasheet_peak(device) -> float | None:
    """Peak FLOP/s of one accelerator chip from the table, or None (CPU, unknown chips)."""
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


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
