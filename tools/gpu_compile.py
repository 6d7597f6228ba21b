"""Compiling the train step for GPUs on a machine without one (``tools.plan --gpu``).

JAX's CUDA plugin (the ``gpu-plan`` extra: ``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` of the installed jax's
version, without NVIDIA's runtime libraries) describes a GPU topology from a target config
(``tools/gpu_targets/<chip>.txtpb``: the chip's cores, memory, bandwidth, compute capability) and XLA compiles
the sharded program for it: CUDA kernels and Pallas (Triton) kernels to the chip's code, with ``ptxas`` from
a CUDA toolkit (``pip install nvidia-cuda-nvcc-cu12`` where none is installed). The process itself computes on
the CPU (``jax_platforms=cpu``), so the plugin loads without a GPU.

What a compile without the device cannot check: cuDNN attention (XLA skips building its graph, its support
check and workspace size without a device; JAX's own check of the installed cuDNN is answered with the
target's version where no cuDNN is installed: ``target_cudnn``) and, on an A100, the Pallas kernels (Pallas assumes compute
capability 9.0 when it has no device to ask).
"""
from __future__ import annotations

import contextlib
import importlib.util
import re
from pathlib import Path

TARGETS = Path(__file__).parent / "gpu_targets"
GPUS_PER_HOST = 8
INSTALL = ("compiling for GPUs needs JAX's CUDA plugin: pip install -e '.[gpu-plan]' (jax-cuda12-plugin and "
           "jax-cuda12-pjrt of the installed jax version; no GPU needed); without it the plan is an analytic estimate")


def plugin_installed() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        return False


def topology_name(gpus: int) -> str:
    """``<slices>x<hosts>x<GPUs per host>`` of ``gpus`` GPUs on hosts of 8: 1x1x4, 1x8x8 (64 GPUs)."""
    if gpus <= GPUS_PER_HOST:
        return f"1x1x{gpus}"
    if gpus % GPUS_PER_HOST:
        raise ValueError(f"--gpus={gpus}: more than {GPUS_PER_HOST} GPUs come in hosts of {GPUS_PER_HOST}; give a "
                         f"multiple of {GPUS_PER_HOST}")
    return f"1x{gpus // GPUS_PER_HOST}x{GPUS_PER_HOST}"


def target_config(chip: str) -> str:
    return (TARGETS / f"{chip}.txtpb").read_text()


def target_number(chip: str, field: str) -> float:
    """A number of the chip's target config (``memory_bandwidth`` in bytes/s, ``device_memory_size``)."""
    return float(re.search(rf"^\s*{field}:\s*([\d.e+]+)", target_config(chip), re.M).group(1))


def gpu_devices(chip: str, gpus: int):
    """The abstract devices of ``gpus`` GPUs of kind ``chip`` (no GPU needed; the plugin is)."""
    if not plugin_installed():
        raise ValueError(INSTALL)
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="cuda", target_config=target_config(chip),
                                        topology=topology_name(gpus)).devices


def cudnn_version(chip: str) -> int:
    """The cuDNN version of the chip's target config (``dnn_version_info``) as cuDNN numbers it:
    major * 10000 + minor * 100 + patch."""
    info = re.search(r"dnn_version_info\s*\{([^}]*)\}", target_config(chip)).group(1)
    part = {k: int(v) for k, v in re.findall(r"(major|minor|patch):\s*(\d+)", info)}
    return part.get("major", 0) * 10000 + part.get("minor", 0) * 100 + part.get("patch", 0)


@contextlib.contextmanager
def target_cudnn(chip: str):
    """Within: JAX's check of the installed cuDNN, which it makes before it emits cuDNN attention, answered with
    the target config's cuDNN version when this machine has no cuDNN (a compile for a GPU that is not here
    targets that GPU's software, as its config describes it). With cuDNN installed, the real check runs."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    real = fused.check_cudnn_version
    try:
        real()
        installed = True
    except RuntimeError:  # "cuDNN not found." / "cuDNN is not detected."
        installed = False
    if not installed:
        fused.check_cudnn_version = lambda: cudnn_version(chip)
    try:
        yield installed
    finally:
        fused.check_cudnn_version = real


def kernels(compiled) -> list[str]:
    """The custom kernels in a compiled GPU program: each Pallas kernel by the name of the function that made
    it (``pallas mha_forward``), cuDNN and other custom calls by their target; sorted, each once."""
    found = set()
    for call in re.finditer(r'custom_call_target="([^"]+)"[^\n]*', compiled.as_text()):
        target, line = call.group(1), call.group(0)
        pallas = re.search(r'op_name="[^"]*?([\w.]+)/pallas_call', line)
        found.add(f"pallas {pallas.group(1)}" if pallas else target)
    return sorted(found)


def hlo_cost(compiled) -> dict:
    """XLA's FLOPs and bytes accessed per device of a compiled program, from its HLO module (a GPU program
    compiled without a device has no ``cost_analysis()``; the CPU backend analyses the module)."""
    from jax._src import xla_bridge
    from jax._src.lib import xla_client

    module = compiled.runtime_executable().hlo_modules()[0]
    cost = xla_client._xla.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
    return {"flops": float(cost.get("flops", 0.0)), "bytes accessed": float(cost.get("bytes accessed", 0.0))}
