"""The benchmarks file's plan tables: ``tools.plan`` over presets x optimizers x TPU topologies, or x 8 and 64
H100s (``--gpu``: the ``gpu-plan`` extra compiles for them; ``gpu_table.md``).

    python -m tools.plan_table [--out results/plans] [--only gpt3-xl] [--gpu]

Each row is one ``python -m tools.plan --json <out>/<row>.json`` (the real train step compiled for the
topology, deviceless), in a process of its own; the markdown table goes to ``<out>/table.md`` and stdout.
Rows that cannot be built (a mesh that does not divide the model) show the reason instead of numbers.
Memory is XLA's memory analysis of the compiled program; step time and MFU are XLA's cost-model
estimates, not measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from tqdm import tqdm

import configs

# (row name, config module, overrides): the presets at their published batch sizes
MODELS = (
    ("gpt2-small", "gpt2_small", {}),
    ("gpt2-xl", "gpt2_small", {"model.name": "gpt2-xl", "model.remat": "full"}),
    ("gpt3-xl", "gpt3_xl", {}),
)
# the Celo2 paper's GPT-3 XL task (its modern architecture, configs/paper_gpt3_xl.py) where it would run: one pod
# slice and eight GPU hosts
PAPER = ("paper-gpt3-xl", "paper_gpt3_xl", {})
OPTIMIZERS = ("adamw", "muon", "celo2")
ORTHOGONALIZING = ("muon", "celo2")
TOPOLOGIES = ("v5p-8", "v5p-128", "v5e-256")
# the large models' Muon and Celo2 rows again with Newton-Schulz dealt out over the chips (optim.orthogonalize),
# beside the rows above, whose matrices are gathered on every chip
DISTRIBUTED = [(model, topo) for model in ("gpt2-xl", "gpt3-xl") for topo in ("v5p-8", "v5p-128")]
GPU_COUNTS = (8, 64)  # H100s: one host, eight hosts
# gpt3-xl on v5p-128 side by side: the XLA attention with whole-sequence logits against the fused kernel and
# the chunked loss (each alone and together)
VARIANTS = (
    ("xla attention, whole logits", {"model.attention": "xla", "loss_chunk": 0}),
    ("xla attention, loss_chunk 256", {"model.attention": "xla", "loss_chunk": 256}),
    ("splash attention, whole logits", {"model.attention": "splash", "loss_chunk": 0}),
    ("splash attention, loss_chunk 256", {"model.attention": "splash", "loss_chunk": 256}),
)


def _optimizer(opt: str, placement: str = "replicated") -> tuple[str, dict]:
    """(the row label's optimizer, its overrides): Muon's and Celo2's with their Newton-Schulz placement."""
    if opt not in ORTHOGONALIZING:
        return opt, {"optimizer.name": opt}
    return f"{opt}, NS {placement}", {"optimizer.name": opt, "optimizer.orthogonalize": placement}


def rows(only: str = ""):
    """(file name, label, config module, overrides, topology) of every row."""
    for model, module, overrides in MODELS:
        if only and model != only:
            continue
        for opt in OPTIMIZERS:
            label, opt_overrides = _optimizer(opt)
            for topo in TOPOLOGIES:
                yield f"{model}-{opt}-{topo}", f"{model} {label}", module, {**overrides, **opt_overrides}, topo
    for model, module, overrides in MODELS:
        for topo in (t for m, t in DISTRIBUTED if m == model and (not only or only == model)):
            for opt in ORTHOGONALIZING:
                label, opt_overrides = _optimizer(opt, "distributed")
                yield (f"{model}-{opt}-{topo}-distributed", f"{model} {label}", module,
                       {**overrides, **opt_overrides}, topo)
    if not only or only == "gpt2-xl":  # d_model 1600 does not split 256 ways: fsdp=64 within data=4 does
        for opt in OPTIMIZERS:
            label, opt_overrides = _optimizer(opt)
            yield (f"gpt2-xl-{opt}-v5e-256-data4", f"gpt2-xl {label}, mesh data=4", "gpt2_small",
                   {**MODELS[1][2], **opt_overrides, "mesh.data": 4}, "v5e-256")
    if not only or only == "gpt3-xl":
        for i, (label, overrides) in enumerate(VARIANTS):
            yield f"gpt3-xl-adamw-v5p-128-variant{i}", f"gpt3-xl adamw, {label}", "gpt3_xl", overrides, "v5p-128"
    if not only or only == PAPER[0]:  # as a user runs it: Newton-Schulz distributed (optimizer.orthogonalize auto)
        for opt in OPTIMIZERS:
            label, opt_overrides = _optimizer(opt, "distributed")
            yield f"{PAPER[0]}-{opt}-v5p-128", f"{PAPER[0]} {label}", PAPER[1], opt_overrides, "v5p-128"


def gpu_rows(only: str = ""):
    """(file name, label, config module, overrides, target flags) of every GPU row."""
    for model, module, overrides in MODELS:
        if only and model != only:
            continue
        for opt in OPTIMIZERS:
            label, opt_overrides = _optimizer(opt)
            for n in GPU_COUNTS:
                yield (f"{model}-{opt}-h100x{n}", f"{model} {label}", module, {**overrides, **opt_overrides},
                       ["--gpu", "h100", "--gpus", str(n)])
    if not only or only == PAPER[0]:
        for opt in OPTIMIZERS:
            label, opt_overrides = _optimizer(opt)
            yield (f"{PAPER[0]}-{opt}-h100x64", f"{PAPER[0]} {label}", PAPER[1], opt_overrides,
                   ["--gpu", "h100", "--gpus", "64"])


def plan_row(module: str, overrides: dict, target: str | list, path: str) -> dict:
    """``python -m tools.plan`` in its own process (a compile's host memory is returned when it exits);
    ``target``: a TPU topology, or the flags of a GPU target."""
    config = os.path.join(os.path.dirname(configs.__file__), f"{module}.py")
    target = ["--topology", target] if isinstance(target, str) else target
    cmd = [sys.executable, "-m", "tools.plan", "--config", config, *target, "--json", path,
           *(f"--config.{k}={v}" for k, v in overrides.items())]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        errors = [line.removeprefix("error: ") for line in r.stderr.splitlines() if line.startswith("error: ")]
        return {"error": f"does not build: {errors[0]}" if errors else
                f"tools.plan exited with {r.returncode} (killed, e.g. out of host memory): {r.stderr[-300:]}"}
    with open(path) as f:
        return json.load(f)


def table_line(label: str, topology: str, plan: dict) -> str:
    if "error" in plan:
        return f"| {label} | {topology} | {plan['error'][:160]} | | | | | | | |"
    d, t = plan["per_device"], plan["target"]
    if "out_of_hbm" in plan:
        return (f"| {label} | {topology} ({t['chips']} chips) | {plan['config']['batch_size']} x "
                f"{plan['config']['seq_len']}, {plan['config']['remat']} | "
                f"{(d['params'] + d['optimizer_state']) / 2**30:.2f} | {d['temporary'] / 2**30:.2f} (XLA: does not "
                f"fit) | > {t['memory_per_device'] / 2**30:.0f} | {_fits(plan)} | - | - | "
                f"{plan['compile_seconds']:.0f} |")
    fits = _fits(plan)
    c = plan["config"]
    seconds = plan["projected_step_seconds"]
    step = f"{seconds:.3f}" if seconds else f"unusable ({plan['xla_estimated_seconds']:.0f})"
    mfu = f"{100 * plan['projected_mfu']:.1f}%" if seconds else "-"
    return (f"| {label} | {topology} ({t['chips']} chips) | {c['batch_size']} x {c['seq_len']}, {c['remat']} | "
            f"{(d['params'] + d['optimizer_state']) / 2**30:.2f} | {d['temporary'] / 2**30:.2f} | "
            f"{d['total'] / 2**30:.2f} / {t['memory_per_device'] / 2**30:.0f} | {fits} | "
            f"{step} | {mfu} | {plan['compile_seconds']:.0f} |")


def gpu_table_line(label: str, plan: dict) -> str:
    """A GPU row: the compiled program's memory against the GPU's, the analytic estimate beside it (and their
    ratio), the custom kernels, a lower bound on the step time."""
    if "error" in plan:
        return f"| {label} | {plan['error'][:160]} | | | | | | | | |"
    c, t = plan["config"], plan["target"]
    if "per_device" not in plan:
        return f"| {label} | {t['chips']} x {t['chip']} | not compiled (analytic only: the gpu-plan extra) | | | | | | | |"
    d, a = plan["per_device"], plan["analytic"]["total"]
    bound = plan.get("lower_bound_step_seconds")
    return (f"| {label} | {t['chips']} x {t['chip']} | {c['batch_size']} x {c['seq_len']}, {c['remat']} | "
            f"{(d['params'] + d['optimizer_state']) / 2**30:.2f} | {d['temporary'] / 2**30:.2f} | "
            f"{d['total'] / 2**30:.2f} / {t['memory_per_device'] / 2**30:.0f} | {_fits(plan)} | "
            f"{a / 2**30:.2f} ({a / d['total']:.2f}x) | {', '.join(plan.get('kernels', [])) or 'none'} | "
            f"{f'{bound:.3f}' if bound else '-'} | {plan['compile_seconds']:.0f} |")


GPU_HEADER = ("| run | GPUs | batch x seq, remat | params + opt state GiB/GPU | temporaries GiB/GPU | total / memory GiB | "
              "fits | analytic estimate GiB (x compiled) | custom kernels | step s, lower bound | compile s |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")


def _fits(plan: dict) -> str:
    return "yes" if plan["fits"] else "no" + (f" ({plan['suggestion']['flags']})" if plan.get("suggestion") else "")


HEADER = ("| run | topology | batch x seq, remat | params + opt state GiB/chip | temporaries GiB/chip | "
          "total / HBM GiB | fits | step s (XLA estimate) | MFU (XLA estimate) | compile s |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def variant_ratios(out: str) -> str:
    """Each gpt3-xl variant's temporaries and projected step time against the first's (XLA attention, whole
    logits), as a sentence under the table; empty until all variants are planned."""
    plans = []
    for i in range(len(VARIANTS)):
        path = os.path.join(out, f"gpt3-xl-adamw-v5p-128-variant{i}.json")
        if not os.path.exists(path):
            return ""
        with open(path) as f:
            plans.append(json.load(f))
    if any("per_device" not in p or not p.get("projected_step_seconds") for p in plans):
        return ""
    base = plans[0]
    parts = [f"{label}: temporaries x{p['per_device']['temporary'] / base['per_device']['temporary']:.2f}, "
             f"projected step x{p['projected_step_seconds'] / base['projected_step_seconds']:.2f}"
             for (label, _), p in zip(VARIANTS[1:], plans[1:])]
    return f"\ngpt3-xl adamw on v5p-128 against {VARIANTS[0][0]}: " + "; ".join(parts) + ".\n"


def _load(out: str, name: str) -> dict | None:
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        plan = json.load(f)
    return plan if "per_device" in plan else None


def placement_ratios(out: str) -> str:
    """For each ``DISTRIBUTED`` row planned so far: its temporaries and projected step against AdamW's on the
    same topology, beside the replicated row's, as lines under the table."""
    lines = []
    for model, topo in DISTRIBUTED:
        adamw = _load(out, f"{model}-adamw-{topo}")
        for opt in ORTHOGONALIZING:
            replicated, distributed = _load(out, f"{model}-{opt}-{topo}"), _load(out, f"{model}-{opt}-{topo}-distributed")
            if not (adamw and replicated and distributed):
                continue

            def ratios(plan):
                temp = plan["per_device"]["temporary"] / adamw["per_device"]["temporary"]
                steps = [p.get("projected_step_seconds") for p in (plan, adamw)]
                return f"temporaries {temp:.2f}x" + (f", step {steps[0] / steps[1]:.3f}x" if all(steps) else "")
            lines.append(f"- {model} {opt} on {topo}: NS replicated {ratios(replicated)}; distributed "
                         f"{ratios(distributed)}")
    if not lines:
        return ""
    return ("\nMuon and Celo2 against AdamW on the same topology (per chip; step: XLA's projected step time), "
            "Newton-Schulz replicated and distributed:\n\n" + "\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/plans")
    p.add_argument("--only", default="", help="one model's rows (gpt2-small, gpt2-xl, gpt3-xl, paper-gpt3-xl)")
    p.add_argument("--cached", action="store_true", help="compile nothing: the table of the rows planned so far")
    p.add_argument("--gpu", action="store_true", help="the GPU table (8 and 64 H100s) instead of the TPU table")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    lines = []
    todo = list(gpu_rows(args.only) if args.gpu else rows(args.only))
    for name, label, module, overrides, topology in tqdm(todo, desc="plans", unit="compile"):
        path = os.path.join(args.out, f"{name}.json")
        if os.path.exists(path):  # rerunning continues where a stopped table left off
            with open(path) as f:
                plan = json.load(f)
        elif args.cached:
            plan = {"error": "not planned yet (python -m tools.plan_table plans it)"}
        else:
            plan = plan_row(module, overrides, topology, path)
            if plan.get("error", "").startswith("does not build"):  # (a killed compile is planned again next time)
                with open(path, "w") as f:
                    json.dump(plan, f)
        lines.append(gpu_table_line(label, plan) if args.gpu else table_line(label, topology, plan))
    table = (GPU_HEADER + "\n" + "\n".join(lines) + "\n" if args.gpu else
             HEADER + "\n" + "\n".join(lines) + "\n" + variant_ratios(args.out) + placement_ratios(args.out))
    with open(os.path.join(args.out, "gpu_table.md" if args.gpu else "table.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
