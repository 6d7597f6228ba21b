"""Plan a run before launching it: does it fit, and what step time should it get?

    python -m tools.plan --config configs/gpt3_xl.py --topology v5p:4x4x4 [--json PATH] [--config.* ...]
    python -m tools.plan --config configs/gpt3_xl.py --gpu h100 --gpus 64

``--topology`` compiles the run's real train step (model, optimizer, mesh, batch, remat, dtype, attention,
loss chunking: all from the config) for a TPU topology on this machine, without a TPU: libtpu describes
the topology's chips (``jax.experimental.topologies``) and XLA compiles the sharded program for them. The
compiled program gives, per device, the bytes of its arguments (params, optimizer state, batch) and its
temporaries, and XLA's cost model gives its FLOPs and an *estimated* time; the projected MFU is

    MFU = model FLOPs per step / (chips * datasheet bf16 peak per chip * projected step seconds),

an estimate, not a measurement. The projected step is XLA's estimate plus, with a fused (Pallas) attention
kernel, whose inside XLA's cost model cannot see, the kernel's FLOPs at the chips' peak rate. A program over
the chip's HBM does not compile: the plan then keeps XLA's figures. Topologies are ``<chip>:<dims>``
(``v5p:4x4x4``, ``v5e:16x16``) or the Cloud names ``v5p-128`` / ``v4-32`` (TensorCores: two per chip) and
``v5e-256`` / ``v6e-64`` (chips).

``--gpu`` compiles the same way for GPUs in hosts of 8 when JAX's CUDA plugin is installed (the ``gpu-plan``
extra; ``tools.gpu_compile``), with a lower bound on the step time instead of XLA's estimate, which it does
not make for GPUs; without the plugin it states the analytic per-device memory of ``tools.memory`` (exact
state bytes, estimated activations for every remat policy) against the GPU's. Both print the analytic
estimate.

``--save step.jaxexe`` writes the compiled train step (``train.executable``): a run on those devices given
``--config.compiled_step=step.jaxexe`` loads it instead of compiling, when it is the same program.

When the run does not fit, the plan names the first change that the estimate says would fit (more
microbatches, then policies that recompute more); ``--search`` compiles it (and the next ones) to verify.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from infra.cli import parse_flags_or_exit, user_errors


def _define_flags() -> None:
    """The command's flags (defined only when it runs: other modules that tests import define --config too)."""
    config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(configs.__file__), "gpt3_xl.py"),
                                    "Run config (a python file).")
    flags.DEFINE_string("topology", "", "TPU topology to compile for: v5p:4x4x4, v5e:16x16, v5p-128, ...")
    flags.DEFINE_string("gpu", "", "GPU to plan for: a100, h100 or h200 (compiled with the gpu-plan extra, else "
                        "an analytic estimate)")
    flags.DEFINE_integer("gpus", 8, "number of GPUs of the --gpu run", lower_bound=1)
    flags.DEFINE_string("json", "", "also write the plan to this JSON file")
    flags.DEFINE_bool("search", False, "when the run does not fit, compile candidates until one fits")
    flags.DEFINE_string("save", "", "write the compiled train step to this file (a run loads it with "
                        "--config.compiled_step=FILE)")


DEFAULT_VOCAB = 50257  # GPT-2's BPE, when the config takes the vocabulary from a corpus (model.vocab_size=0)
MAX_SEARCH_COMPILES = 3
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # least to most recomputation


def tpu_topology(name: str) -> tuple[str, str, int]:
    """(chip, libtpu topology name, number of chips) of ``v5p:4x4x4`` or a Cloud name such as ``v5p-128``.

    Cloud names count TensorCores for v4 and v5p (two per chip) and chips for v5e and v6e; the chips are
    laid out as a torus grown from 2x2x1 (3D chips) or 1x1 (2D) by doubling its last smallest side.
    """
    from train.flops import TPU_CHIPS

    m = re.fullmatch(r"(v\d+[a-z]*)(?::(\d+(?:x\d+)+)|-(\d+))", name.strip().lower().replace("litepod", "e"))
    chip = m.group(1) if m else None
    if chip not in TPU_CHIPS:
        raise ValueError(f"--topology {name!r} is not a TPU topology: use <chip>:<dims> or <chip>-<size> with chip "
                         f"one of {', '.join(TPU_CHIPS)}, e.g. v5p:4x4x4 or v5p-128")
    if m.group(2):
        dims = [int(d) for d in m.group(2).split("x")]
    else:
        size = int(m.group(3))
        chips = size // 2 if chip in ("v4", "v5p") else size
        dims = [2, 2, 1] if chip in ("v4", "v5p") else [1, 1]
        while math.prod(dims) < chips:
            smallest = min(dims)
            dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
        if math.prod(dims) != chips:
            raise ValueError(f"--topology {name}: {chips} chips is not a slice size; use a power of two "
                             f"({'8, 16, 32, ...' if chip in ('v4', 'v5p') else '4, 8, 16, ...'})")
    return chip, f"{chip}:{'x'.join(map(str, dims))}", math.prod(dims)


def tpu_devices(topology: str):
    """The abstract devices of a TPU topology (libtpu needed; no TPU needed)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ValueError("--topology needs libtpu to compile for TPUs: pip install -e '.[tpu]' "
                         "(or pip install 'jax[tpu]==<the installed jax version>')") from None
    from jax.experimental import topologies

    # No TPU host here: skip the metadata-server queries that would describe one, and libtpu's log lines; no
    # TPU to guard either, so several plans may load libtpu at once (it otherwise holds /tmp/libtpu_lockfile)
    for var, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                       ("TPU_HOST_BOUNDS", "1,1,1"), ("TPU_STDERR_LOG_LEVEL", "3"), ("TPU_MIN_LOG_LEVEL", "3")):
        os.environ.setdefault(var, value)
    return topologies.get_topology_desc(topology, "tpu").devices


def plan_config(cfg):
    """The loaded config as planned: the vocabulary fixed when it would come from a corpus (nothing is read)."""
    from train.config import load_config

    cfg, notes = load_config(cfg), []
    if not cfg.model.vocab_size:
        cfg.model.vocab_size = DEFAULT_VOCAB
        notes.append(f"model.vocab_size=0 takes the corpus tokenizer's vocabulary: planned with {DEFAULT_VOCAB} "
                     f"(GPT-2), padded to a multiple of {cfg.model.vocab_multiple}")
    return cfg, notes


# XLA's TPU compiler refuses a program that cannot fit: "... the total memory required for HLO temporaries
# (28.25G) exceeds available HBM (15.75G)"
_OUT_OF_HBM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")


def compile_step(run, save: str = "") -> dict:
    """Compile ``run``'s train step for its (abstract) devices: per-device bytes, FLOPs, XLA's time estimate;
    with ``save``, the compiled step written there (``train.executable``).

    A program that does not fit in HBM does not compile for a TPU: then the plan keeps XLA's figures for the
    temporaries it needed and the HBM it had (``out_of_hbm``), and has no cost analysis.
    """
    import jax

    from tools.memory import shard_bytes

    run.check()
    step = run.train_step  # built outside the mesh context: optimizers may compute constants eagerly
    state = {"params": shard_bytes(run.layout.abstract.params),
             "optimizer_state": shard_bytes(run.layout.abstract.opt_state)}
    out = {"host_peak_rss_bytes": 0, "devices": run.mesh.size}
    t = time.perf_counter()
    try:
        with jax.set_mesh(run.mesh):
            compiled = step.lower(run.layout.abstract, run.abstract_batch()).compile()
    except jax.errors.JaxRuntimeError as e:
        found = _OUT_OF_HBM.search(str(e))
        if not found:
            raise
        temp, hbm = (float(found.group(i)) * 2 ** (10 * "KMGT".index(found.group(i + 1)) + 10) for i in (1, 3))
        return {**out, "compile_seconds": time.perf_counter() - t, "host_peak_rss_bytes": _peak_rss(),
                "out_of_hbm": {"temporary": temp, "hbm": hbm, "message": found.group(0)},
                "per_device": {**state, "temporary": temp, "total": sum(state.values()) + temp}}
    seconds = time.perf_counter() - t
    if save:
        from train import executable

        out["saved_step"] = {"path": save, "bytes": executable.save(save, compiled, executable.program_key(run))}
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost is None:  # a GPU program compiled without a device: its HLO module's cost analysis, no time estimate
        from tools.gpu_compile import hlo_cost, kernels

        cost = hlo_cost(compiled)
        out["kernels"] = kernels(compiled)
    per_device = {**state, "batch": mem.argument_size_in_bytes - sum(state.values()),
                  "outputs_not_aliased": mem.output_size_in_bytes - mem.alias_size_in_bytes,
                  "temporary": mem.temp_size_in_bytes, "code": mem.generated_code_size_in_bytes}
    per_device["total"] = sum(per_device.values())
    return {**out, "compile_seconds": seconds, "per_device": per_device, "host_peak_rss_bytes": _peak_rss(),
            "xla_flops_per_device": float(cost.get("flops", 0.0)),
            "xla_bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
            "xla_estimated_seconds": float(cost.get("optimal_seconds", 0.0))}


def compile_optimizer_update(run) -> dict:
    """The optimizer's update alone (``tx.update`` on gradients laid out like the params), compiled for the
    run's devices: per device, XLA's FLOPs, temporaries and estimated seconds of the optimizer's part of a step
    (inside the train step XLA may fuse it with the rest, so this is its share as a program of its own)."""
    import jax

    tx, abstract = run.optimizer.tx, run.layout.abstract

    def update(grads, opt_state, params):
        return tx.update(grads, opt_state, params, loss=jax.numpy.zeros(()))[0]

    with jax.set_mesh(run.mesh):
        compiled = jax.jit(update, out_shardings=run.layout.shardings.params).lower(
            abstract.params, abstract.opt_state, abstract.params).compile()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    return {"xla_flops_per_device": float(cost.get("flops", 0.0)),
            "temporary": compiled.memory_analysis().temp_size_in_bytes,
            "xla_estimated_seconds": float(cost.get("optimal_seconds", 0.0))}


def _peak_rss() -> int:
    """This process's peak resident memory so far (compiling a big model for many chips takes tens of GB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def candidates(cfg, n_shards: int):
    """Changes that lower memory, in order: more microbatches (doubling while the microbatch still divides
    over the batch shards), then each policy that recomputes more, from the configured microbatches on.
    Yields (change, the flags that make it)."""
    for remat in REMAT_ORDER[REMAT_ORDER.index(cfg.model.remat):]:
        k = cfg.microbatches * (2 if remat == cfg.model.remat else 1)
        while cfg.batch_size % k == 0 and (cfg.batch_size // k) % n_shards == 0:
            yield {"microbatches": k, "remat": remat}, f"--config.microbatches={k} --config.model.remat={remat}"
            k *= 2


def _changed(cfg, change: dict):
    """A copy of ``cfg`` with a candidate's microbatches and remat policy."""
    cfg = cfg.copy_and_resolve_references()
    cfg.microbatches = change["microbatches"]
    cfg.model.remat = change["remat"]
    return cfg


def suggest(run, budget: float, compiled: dict | None, verify: bool) -> dict | None:
    """The first candidate change whose estimated per-device total fits in ``budget`` bytes, or None.

    The estimate is ``tools.memory``'s; with a compiled plan it is the compiled total with the temporaries
    scaled by the analytic activations' ratio (candidate / planned) and the gradient accumulator added.
    ``verify`` compiles candidates (at most ``MAX_SEARCH_COMPILES``) until one fits.
    """
    from train.build import build_run
    from tools.memory import estimate

    base = estimate(run)
    compiles = 0
    for change, flags_text in candidates(run.cfg, run.mesh.shape["data"] * run.mesh.shape["fsdp"]):
        candidate = build_run(_changed(run.cfg, change), run.devices, run.platform)
        est = estimate(candidate)
        total = est["total"]
        if compiled:
            scaled = compiled["per_device"]["temporary"] * _activations(est) / max(_activations(base), 1.0)
            total = (compiled["per_device"]["total"] - compiled["per_device"]["temporary"] + scaled
                     + est["gradients"] - base["gradients"])
        if total > budget:
            continue
        out = {"change": change, "flags": flags_text, "estimated_total": total}
        if not verify:
            return out
        result = compile_step(candidate)
        out["compiled_total"] = result["per_device"]["total"]
        compiles += 1
        if out["compiled_total"] <= budget and "out_of_hbm" not in result:
            return out
        if compiles >= MAX_SEARCH_COMPILES:
            return {**out, "gave_up": f"still over the device's memory after {compiles} compiles"}
    return None


def _activations(est: dict) -> float:
    return est["layers"] + est["recompute"] + est["logits"]


def _projection(run, compiled: dict, n_chips: int, peak: float) -> dict:
    """XLA's FLOPs and estimated step time, and the MFU they project.

    XLA's cost model does not see inside a Pallas kernel (a custom call): with a fused attention kernel its
    FLOPs (the model's attention term, ``train.flops.attention_flops_per_token``) are added, at the chips'
    peak rate to the time, which makes the kernel's share of the projected time a lower bound.
    """
    from train.flops import attention_flops_per_token

    m, seconds = run.model_cfg, compiled["xla_estimated_seconds"]
    kernel = 0.0 if m.attention == "xla" else (
        attention_flops_per_token(m.n_layers, m.d_model, run.cfg.seq_len) * run.tokens_per_step)
    out = {"xla_flops_per_step": compiled["xla_flops_per_device"] * compiled["devices"],
           "kernel_flops_not_in_xla": kernel, "projected_step_seconds": None, "projected_mfu": None}
    if seconds > 0:  # XLA's cost model answers a negative time for some topologies (v5e:16x16)
        step = seconds + kernel / (n_chips * peak)
        out.update(projected_step_seconds=step, projected_mfu=run.flops_per_step / (n_chips * peak * step))
    return out


def make_plan(cfg, *, topology: str = "", gpu: str = "", gpus: int = 8, search: bool = False, save: str = "") -> dict:
    """The plan of ``cfg`` on a TPU topology or on ``gpus`` GPUs (compiled, else analytic; see the module doc);
    ``save``: where to write the compiled train step."""
    from train.build import build_run
    from train.flops import CHIPS, GPU_CHIPS
    from tools.memory import estimate

    if bool(topology) == bool(gpu):
        raise ValueError("give one target: --topology <TPU topology> (compiled) or --gpu a100|h100|h200 (analytic)")
    cfg, notes = plan_config(cfg)
    if topology:
        chip_name, topology, n_chips = tpu_topology(topology)
        devices = tpu_devices(topology)
        target = {"kind": "tpu", "topology": topology}
    else:
        if gpu.lower() not in GPU_CHIPS:
            raise ValueError(f"--gpu {gpu!r} is not one of {', '.join(GPU_CHIPS)}")
        if gpus < 1:
            raise ValueError(f"--gpus={gpus} must be a positive number of GPUs")
        chip_name, n_chips = gpu.lower(), gpus
        devices, target = _gpu_target(chip_name, gpus, notes)
    chip = CHIPS[chip_name]
    n_devices = devices if isinstance(devices, int) else len(devices)
    budget = chip.hbm_bytes * n_chips / n_devices
    target.update(chip=chip_name, chips=n_chips, devices=n_devices, memory_per_device=budget,
                  peak_flops_per_chip=chip.peak_flops)
    if save and isinstance(devices, int):
        raise ValueError(f"--save needs a compiled program, and nothing is compiled here: {notes[-1]}")
    run = build_run(cfg, devices, "gpu" if gpu else "")
    run.check()
    m = run.model_cfg
    plan = {"config": {"model": cfg.model.name, "params": run.n_params, "optimizer": cfg.optimizer.name,
                       "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "tokens_per_step": run.tokens_per_step,
                       "microbatches": cfg.microbatches, "remat": m.remat, "compute_dtype": m.compute_dtype,
                       "attention": m.attention, "document_mask": m.document_mask,
                       "loss_chunk": cfg.loss_chunk, "vocab_size": m.vocab_size, "mesh": dict(run.mesh.shape),
                       "orthogonalize": run.placement.name if run.placement else None},
            "target": target, "notes": notes, "model_flops_per_step": run.flops_per_step,
            "analytic": estimate(run),
            "analytic_total_per_remat": {r: estimate(run, r)["total"] for r in REMAT_ORDER}}
    compiled = None
    if not isinstance(devices, int):
        with _cudnn_answered(chip_name, gpu, m.attention, notes):
            compiled = compile_step(run, save)
        plan.update(compiled)
        if "out_of_hbm" not in compiled:
            plan.update(_projection(run, compiled, n_chips, chip.peak_flops))
            plan["optimizer_update"] = compile_optimizer_update(run)
        if gpu:
            plan["lower_bound_step_seconds"] = _gpu_bound(plan, chip_name, n_chips, chip.peak_flops)
        total = compiled["per_device"]["total"]
    else:
        total = plan["analytic"]["total"]
    plan["fits"] = total <= budget and "out_of_hbm" not in plan
    if not plan["fits"]:
        plan["suggestion"] = suggest(run, budget, compiled, search)
    return plan


def _gpu_target(chip: str, gpus: int, notes: list) -> tuple:
    """(the devices to build the run on, the plan's target) for ``gpus`` GPUs: abstract devices to compile
    for when JAX's CUDA plugin is installed, else their number (the analytic estimate)."""
    from tools.gpu_compile import INSTALL, gpu_devices, plugin_installed, topology_name

    if not plugin_installed():
        notes.append(INSTALL)
        return gpus, {"kind": "gpu"}
    notes.append("not checkable without a GPU: cuDNN attention's support and workspace (XLA builds no cuDNN "
                 "graph without a device)" + ("; Pallas kernels for an A100 (Pallas assumes compute capability "
                                             "9.0 without a device)" if chip == "a100" else ""))
    return gpu_devices(chip, gpus), {"kind": "gpu", "topology": topology_name(gpus)}


@contextlib.contextmanager
def _cudnn_answered(chip: str, gpu: str, attention: str, notes: list):
    """A GPU compile of cuDNN attention on a machine without cuDNN: JAX's version check answered with the target's
    (``tools.gpu_compile.target_cudnn``), and said so."""
    if not gpu or attention != "cudnn":
        yield
        return
    from tools.gpu_compile import cudnn_version, target_cudnn

    with target_cudnn(chip) as installed:
        if not installed:
            v = cudnn_version(chip)
            notes.append(f"no cuDNN here: cuDNN attention compiled for the target's cuDNN {v // 10000}.{v // 100 % 100}."
                         f"{v % 100} (tools/gpu_targets/{chip}.txtpb)")
        yield


def _gpu_bound(plan: dict, chip: str, n_chips: int, peak: float) -> float:
    """A lower bound on the step time of a program compiled for GPUs, which XLA does not estimate: its FLOPs
    (XLA's, plus a fused attention kernel's, which XLA cannot see) at the datasheet peak, or its bytes at the
    memory bandwidth, whichever takes longer."""
    from tools.gpu_compile import target_number

    flops = plan["xla_flops_per_step"] + plan["kernel_flops_not_in_xla"]
    return max(flops / (n_chips * peak),
               plan["xla_bytes_accessed_per_device"] / target_number(chip, "memory_bandwidth"))


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def format_plan(plan: dict) -> str:
    """The plan as the command prints it."""
    c, t, a = plan["config"], plan["target"], plan["analytic"]
    compiled = plan.get("per_device")
    where = (f"an analytic estimate for {t['chips']} x {t['chip']} (nothing compiled)" if not compiled else
             f"the program compiled for {t['chips']} x {t['chip']} GPUs, topology {t['topology']} (deviceless)"
             if t["kind"] == "gpu" else
             f"the program compiled for TPU {t['topology']} ({t['chips']} chips, {t['devices']} devices; deviceless)")
    lines = [f"plan: {where}",
             f"  {c['model']} {c['params'] / 1e6:.1f}M params, {c['optimizer']}, batch {c['batch_size']} x "
             f"{c['seq_len']} = {c['tokens_per_step']:,} tokens, microbatches {c['microbatches']}, remat "
             f"{c['remat']}, {c['compute_dtype']}, attention {c['attention']}, loss_chunk {c['loss_chunk']}",
             "  mesh " + " ".join(f"{k}={v}" for k, v in c["mesh"].items())
             + (f"; Newton-Schulz {c['orthogonalize']} (optimizer.orthogonalize)" if c.get("orthogonalize") else "")]
    lines += [f"  note: {n}" for n in plan["notes"]]
    lines.append(f"per device{'':22}{'compiled (XLA)' if compiled else '':>14}  {'analytic estimate':>17}")
    rows = [("parameters", "params", "params"), ("optimizer state", "optimizer_state", "optimizer_state"),
            ("gradients", None, "gradients"), ("batch", "batch", None),
            ("outputs (not aliased)", "outputs_not_aliased", None), ("program code", "code", None),
            ("temporaries", "temporary", None), ("  saved activations", None, "layers"),
            ("  one layer recomputed", None, "recompute"), ("  logits (float32)", None, "logits"),
            ("total", "total", "total")]
    for label, ckey, akey in rows:
        if compiled is None and ckey and not akey:
            continue
        cval = _gib(compiled[ckey]) if compiled and ckey in compiled else ""
        lines.append(f"  {label:<30}{cval:>14}  {_gib(a[akey]) if akey else '':>17}")
    total = compiled["total"] if compiled else a["total"]
    lines.append(f"  {total / 2**30:.2f} GiB{'+' if 'out_of_hbm' in plan else ''} of "
                 f"{t['memory_per_device'] / 2**30:.2f} GiB per device "
                 f"({100 * total / t['memory_per_device']:.0f}%): {'fits' if plan['fits'] else 'DOES NOT FIT'}")
    lines.append("  analytic total per remat policy: " + ", ".join(
        f"{r} {v / 2**30:.1f} GiB" for r, v in plan["analytic_total_per_remat"].items()))
    if not plan["fits"]:
        lines.append("  " + _suggestion_text(plan.get("suggestion")))
    if compiled:
        lines.append(f"compile {plan['compile_seconds']:.1f} s on this machine, host memory peak "
                     f"{plan['host_peak_rss_bytes'] / 2**30:.1f} GiB")
        if "out_of_hbm" in plan:
            lines.append(f"XLA refused the program: {plan['out_of_hbm']['message']} (no cost analysis)")
        else:
            lines += _flops_lines(plan)
    else:
        lines.append(f"model FLOPs per step: {plan['model_flops_per_step']:.3e}; no step time without a compiled "
                     "program (run tools.bench on the GPU)")
    return "\n".join(lines)


def _flops_lines(plan: dict) -> list[str]:
    c, t = plan["config"], plan["target"]
    xla, kernel, model = plan["xla_flops_per_step"], plan["kernel_flops_not_in_xla"], plan["model_flops_per_step"]
    lines = [f"FLOPs per step: XLA {xla:.3e} (all devices)"
             + (f" + {kernel:.3e} in the {c['attention']} kernel (XLA cannot see them)" if kernel else "")
             + f", model {model:.3e} (6N + attention); ratio {(xla + kernel) / model:.2f}"]
    if "kernels" in plan:
        lines.append("custom kernels compiled: " + (", ".join(plan["kernels"]) or "none"))
    if "optimizer_update" in plan:
        o = plan["optimizer_update"]
        lines.append(f"optimizer update compiled alone: XLA {o['xla_flops_per_device'] * t['devices']:.3e} FLOPs "
                     f"(all devices), temporaries {o['temporary'] / 2**30:.2f} GiB per device"
                     + (f", XLA's estimate {o['xla_estimated_seconds']:.4f} s" if o["xla_estimated_seconds"] > 0
                        else ""))
    if "lower_bound_step_seconds" in plan:
        bound = plan["lower_bound_step_seconds"]
        return lines + [f"step time at least {bound:.4f} s (a lower bound, not an estimate: FLOPs at the datasheet "
                        f"peak or bytes at the memory bandwidth, whichever is longer; XLA gives no GPU time "
                        f"estimate); MFU at most {100 * plan['model_flops_per_step'] / (t['chips'] * t['peak_flops_per_chip'] * bound):.1f}%"]
    step = plan["projected_step_seconds"]
    if not step:
        return lines + [f"XLA's cost model gave no usable step time for this topology "
                        f"({plan['xla_estimated_seconds']:.3g} s): no projection"]
    kernel_note = f"; the {c['attention']} kernel counted at peak, a lower bound on its time" if kernel else ""
    return lines + [f"projected by XLA's cost model (an estimate, not a measurement{kernel_note}): step {step:.3f} s, "
                    f"{c['tokens_per_step'] / step:,.0f} tokens/s, MFU {100 * plan['projected_mfu']:.1f}% of "
                    f"{t['chips']} x {t['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s (datasheet bf16)"]


def _suggestion_text(s: dict | None) -> str:
    if s is None:
        return ("no number of microbatches or remat policy fits: add chips, or tensor parallelism "
                "(--config.mesh.tensor=N)")
    text = f"would fit with {s['flags']} (estimate {s['estimated_total'] / 2**30:.2f} GiB per device"
    if "compiled_total" in s:
        text += f"; compiled: {s['compiled_total'] / 2**30:.2f} GiB" + (f", {s['gave_up']}" if "gave_up" in s else "")
    return text + ")" + ("" if "compiled_total" in s else "; --search compiles it to check")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    # libtpu only describes the TPU; this process computes on the CPU (and must not look for a TPU to run on)
    jax.config.update("jax_platforms", "cpu")
    f = flags.FLAGS
    with user_errors():
        if f.topology:
            print(f"compiling for {f.topology} (minutes for billion-parameter models) ...", file=sys.stderr,
                  flush=True)
        plan = make_plan(f.config, topology=f.topology, gpu=f.gpu, gpus=f.gpus, search=f.search, save=f.save)
        print(format_plan(plan))
        if "saved_step" in plan:
            print(f"wrote the compiled train step to {f.save} ({plan['saved_step']['bytes'] / 2**20:.1f} MiB); "
                  f"on those devices: python -m train ... --config.compiled_step={f.save}")
        if f.json:
            with open(f.json, "w") as out:
                json.dump(plan, out, indent=1)
            print(f"wrote {f.json}")


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
