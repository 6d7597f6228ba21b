"""``python -m tools.bench``: throughput, MFU, memory and optimizer cost, measured in one process.

(a) the device: achieved matmul FLOP/s (n x n x n in the compute dtype) and memory bandwidth (a large
    elementwise copy, read + write bytes / s);
(b) per model preset: compile time, train-step time (median of repeated steps after warm-up), tokens/s,
    achieved FLOP/s from the analytic model FLOPs (``train.flops.flops_per_token``: 6(N - looked-up tables) + 12*L*D*T
    per token), MFU against the datasheet peak (accelerators) and against the best measured matmul rate
    (the faster of (a) at the start and again after the presets: the rate the device reaches on its own), and
    peak memory (device statistics on accelerators, the compiled program's buffers on CPU); with ``--data``,
    the input pipeline: seconds to load and transfer one batch, and the input wait per step: the train
    loop's pattern (dispatch step k, load batch k + 1 while it runs, read step k - 1's metrics) fed by the
    pipeline, minus the same loop on one fixed batch;
(c) with ``--matmuls``, per timed preset: every matmul of its train step timed alone (``tools.matmul_ceiling``),
    their sum (the matmul time: no step with these kernels is faster) and the MFU ceiling it allows, model FLOPs
    / matmul time / best matmul rate;
    with ``--config.diagnostics_every=N``, the train step with the per-layer diagnostics (``train.diagnostics``)
    timed interleaved with the plain one, and their cost per step when every N-th step is one;
(d) per optimizer: the update alone (jitted ``tx.update`` + apply on the preset's parameters, median),
    its share of the step, optimizer-state bytes per parameter and the update's temporary memory.

Timed callables that are compared are interleaved (a, b, a, b, ...): the optimizers with each other, so
that ratios hold on a machine whose load varies, and the step with a matmul whose rate is printed only as
a load check, not used as MFU's denominator: on a CPU, a matmul right after a train step runs at about half
its rate (measured for cpu-small: 247 against 506 GFLOP/s on its own; 377 after a 50 ms pause, 503 after
300 ms), so the interleaved rate is depressed by the very step it would be the yardstick of. ``--aot``
presets are only lowered and compiled against abstract shapes (nothing is allocated): the way to check on
a CPU that GPT-3 XL's sharded train step compiles, and what it needs in memory (for a TPU topology:
``tools.plan``).
"""
from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags, logging
from ml_collections import config_flags

import configs
from infra.cli import parse_flags_or_exit, user_errors


_MATMUL_REPEATS = 7  # timed calls of each of the step's matmuls (--matmuls)


def _define_flags() -> None:
    """The command's flags (defined only when it runs: tests import this module beside others defining --config)."""
    config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(configs.__file__), "bench.py"),
                                    "Run config (a python file): model, batch, mesh, dtype, data as in training.")
    flags.DEFINE_list("presets", [], "model presets to time (default: the config's model.name)")
    flags.DEFINE_list("optimizers", ["adamw", "muon", "celo2", "celo2_base", "velo"],
                      "optimizers whose update to time (optim.registry names, NAME:PLACEMENT for an "
                      "optimizer.orthogonalize other than the config's, e.g. muon:distributed; empty: none)")
    flags.DEFINE_list("aot", [], "presets to compile only (abstract shapes)")
    flags.DEFINE_integer("steps", 5, "timed repeats after warm-up", lower_bound=1)
    flags.DEFINE_bool("matmuls", False, "also time every matmul of each timed preset's step alone: the MFU "
                      "ceiling they allow")
    flags.DEFINE_string("json", "", "also write the numbers to this JSON file")


def _medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each blocking zero-argument callable over ``repeats`` calls, after one warm-up call
    each; the calls are interleaved (a, b, a, b, ...) so that every callable sees the same machine load."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}


def _matmul(dtype):
    """(a blocking n x n x n matmul on the first device, its FLOPs)."""
    import jax
    import jax.numpy as jnp

    n = 4096 if jax.devices()[0].platform != "cpu" else 2048
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    return (lambda: f(a).block_until_ready()), 2.0 * n**3


def _bytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def device_rates(dtype) -> dict:
    import jax
    import jax.numpy as jnp

    matmul, matmul_flops = _matmul(dtype)
    x = jnp.ones((8192, 8192 if jax.devices()[0].platform != "cpu" else 4096), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    t = _medians({"matmul": matmul, "copy": lambda: copy(x).block_until_ready()}, 5)
    return {"matmul_flops_per_sec": matmul_flops / t["matmul"], "memory_bytes_per_sec": 2 * x.nbytes / t["copy"]}


def _run(cfg, preset: str, opt_name: str):
    """The benchmarked run of a preset and optimizer (learned ones with their shipped weights; ``name:placement``
    sets ``optimizer.orthogonalize``) with the rest of ``cfg`` (as given: it is loaded here), which reads no data."""
    from train.build import build_run
    from train.config import load_config

    cfg = cfg.copy_and_resolve_references()
    opt_name, _, placement = opt_name.partition(":")
    cfg.model.name, cfg.optimizer.name, cfg.optimizer.lr = preset, opt_name, 0.0  # 0: the optimizer's default
    if placement:
        cfg.optimizer.orthogonalize = placement
    return build_run(load_config(cfg))


def _input_feed(cfg, mesh):
    """A blocking callable that loads the next training batch of ``cfg.data.dir`` onto the mesh, or None when
    that dataset is not prepared (the benchmark never prepares one)."""
    import jax

    import data
    from train.step import batch_sharding

    if not cfg.data.dir or not os.path.isdir(cfg.data.dir):
        return None
    info = data.load_info(cfg.data.dir)
    if info.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"data.dir={cfg.data.dir} has a vocabulary of {info.vocab_size} > model.vocab_size="
                         f"{cfg.model.vocab_size}: set --config.model.vocab_size={info.vocab_size}, or "
                         "--config.data.dir='' to time the step without the input pipeline")
    it = data.train_iterator(info, seq_len=cfg.seq_len, global_batch_size=cfg.batch_size, seed=0)
    sharding = batch_sharding(mesh)
    return lambda: jax.block_until_ready(
        {k: jax.make_array_from_process_local_data(sharding, v) for k, v in next(it).items()})


def _random_batch(cfg, sharding) -> dict:
    import jax
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (cfg.batch_size, cfg.seq_len)
    batch = {"inputs": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
             "segment_ids": np.ones(shape, np.int32), "loss_mask": np.ones(shape, np.float32)}
    batch["targets"] = np.roll(batch["inputs"], -1, axis=1)
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


def _loop(compiled, holder, load_batch, steps: int):
    """train.loop's pattern over ``steps`` steps: dispatch step k, load batch k + 1, read step k - 1's metrics."""
    import jax

    def run():
        pending, next_batch = None, load_batch()
        for _ in range(steps):
            holder["state"], m = compiled(holder["state"], next_batch)
            next_batch = load_batch()
            if pending is not None:
                jax.device_get(pending)
            pending = m
        jax.device_get(pending)
    return run


def bench_preset(cfg, preset: str, *, timed: bool, steps: int = 5, matmuls: bool = False) -> dict:
    """Compile the preset's AdamW train step (and with ``timed``, time it over ``steps`` repeats; with
    ``matmuls`` also its matmuls alone: see the module docstring)."""
    import jax

    run = _run(cfg, preset, "adamw")
    row = {"preset": preset, "params": run.n_params, "tokens_per_step": run.tokens_per_step,
           "attention": run.model_cfg.attention,
           "model_flops_per_step": run.flops_per_step}
    with jax.set_mesh(run.mesh):
        t = time.perf_counter()
        compiled = run.train_step.lower(run.layout.abstract, run.abstract_batch()).compile()
        row["compile_seconds"] = time.perf_counter() - t
    mem = compiled.memory_analysis()
    row["compiled_memory_bytes"] = int(mem.argument_size_in_bytes + mem.temp_size_in_bytes)
    if timed:
        row.update(_time_step(run, compiled, steps))
    if timed and matmuls:
        row["matmuls"] = _time_matmuls(run)
    return row


def _time_matmuls(run) -> list[dict]:
    """Each matmul of the step (``tools.matmul_ceiling``) timed alone, one at a time (so that only its own
    operands are held): seconds per step = calls per step x the median call."""
    from tools.matmul_ceiling import product_call, step_products

    if run.mesh.devices.size > 1:
        raise ValueError(f"--matmuls times the whole step's matmuls on one device, but the mesh has "
                         f"{run.mesh.devices.size}: pass --config.mesh.tensor=1 --config.cpu_devices=1")
    m, c = run.model_cfg, run.cfg
    rows = []
    for p in step_products(m.n_layers, m.d_model, m.n_heads, m.vocab_size, c.batch_size, c.seq_len):
        t = _medians({p.name: product_call(p, m.compute_dtype)}, _MATMUL_REPEATS)[p.name]
        rows.append(dict(name=p.name, shape=f"{p.batch} x [{p.m}x{p.k}] x [{p.k}x{p.n}]", count=p.count,
                         flops=p.flops, seconds=p.count * t))
    return rows


def _matmul_lines(row: dict) -> list[str]:
    """Each matmul's time per step and rate, then the sum and the MFU ceiling it allows."""
    lines = [f"  {m['name']:<18} {m['shape']:<32} x{m['count']:<3} {m['seconds'] * 1e3:8.1f} ms "
             f"{m['flops'] / m['seconds'] / 1e9:7.1f} GFLOP/s" for m in row["matmuls"]]
    return lines + [f"  matmuls of the step, each timed alone: {row['matmul_seconds'] * 1e3:.1f} ms "
                    f"({row['matmul_seconds'] / row['step_seconds']:.0%} of the step); MFU ceiling with nothing "
                    f"else taking time: {100 * row['mfu_ceiling']:.1f}%"]


def _time_step(run, compiled, steps: int) -> dict:
    import jax

    from train.flops import datasheet_peak

    batch, holder = _random_batch(run.cfg, run.batch_sharding), {"state": run.init_state()}

    def one_step():
        holder["state"], m = compiled(holder["state"], batch)
        m["loss"].block_until_ready()

    matmul, matmul_flops = _matmul(jax.numpy.dtype(run.cfg.model.compute_dtype))
    timed = {"step": one_step, "matmul": matmul}
    if run.cfg.diagnostics_every:
        holder["previous"] = run.zero_updates(holder["state"].params)

        def diagnostics_step():
            holder["state"], m, holder["previous"] = run.diagnostics_step(holder["state"], batch, holder["previous"])
            m["loss"].block_until_ready()

        timed["diagnostics_step"] = diagnostics_step
    feed, loop_steps = _input_feed(run.cfg, run.mesh), 4
    if feed is not None:
        timed.update(input=feed, loop=_loop(compiled, holder, feed, loop_steps),
                     loop_fixed_batch=_loop(compiled, holder, lambda: batch, loop_steps))
    t = _medians(timed, steps)
    dt, flops, n_devices = t["step"], run.flops_per_step, run.mesh.devices.size
    peak_sheet = datasheet_peak(jax.devices()[0])
    # simulated CPU devices share the host's cores: one matmul rate; accelerators: one per device
    row = dict(step_seconds=dt, tokens_per_sec=run.tokens_per_step / dt, achieved_flops_per_sec=flops / dt,
               matmul_interleaved_flops_per_sec=matmul_flops / t["matmul"],
               matmul_devices=n_devices if peak_sheet else 1)
    if "diagnostics_step" in t:  # every N-th step is the diagnostics step: its extra time spread over N steps
        row.update(diagnostics_step_seconds=t["diagnostics_step"], diagnostics_every=run.cfg.diagnostics_every,
                   diagnostics_overhead=(t["diagnostics_step"] - dt) / run.cfg.diagnostics_every / dt)
    if feed is not None:
        row.update(input_seconds=t["input"],
                   input_wait_seconds=max(0.0, t["loop"] - t["loop_fixed_batch"]) / loop_steps)
    if peak_sheet:
        row["mfu_datasheet"] = flops / dt / (peak_sheet * n_devices)
        stats = jax.devices()[0].memory_stats() or {}
        row["peak_memory_bytes"] = stats.get("peak_bytes_in_use")
    holder.clear()
    return row


def _optimizer_update(run, timed: dict, name: str) -> dict:
    """Compile ``run``'s optimizer update (+ apply) on random params and gradients; register the blocking
    update under ``name`` in ``timed``; return its row without the time."""
    import jax
    import optax

    layout, tx = run.layout, run.optimizer.tx
    params_abs, state_abs = layout.abstract.params, layout.abstract.opt_state

    def update(params, grads, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params, loss=0.0)
        return optax.apply_updates(params, updates), opt_state

    with jax.set_mesh(run.mesh):
        compiled = jax.jit(update, donate_argnums=(0, 2)).lower(params_abs, params_abs, state_abs).compile()
        leaves, treedef = jax.tree.flatten(params_abs)

        def make(seed):
            arrays = [0.02 * jax.random.normal(jax.random.key(seed + 7 * i), a.shape, a.dtype)
                      for i, a in enumerate(leaves)]
            return jax.device_put(jax.tree.unflatten(treedef, arrays), layout.shardings.params)

        params, grads = make(0), make(1)
        holder = {"p": params, "s": jax.jit(tx.init, out_shardings=layout.shardings.opt_state)(params)}

    def one():
        holder["p"], holder["s"] = compiled(holder["p"], grads, holder["s"])
        jax.block_until_ready(holder["p"])

    timed[name] = one
    n = sum(x.size for x in leaves)
    return {"optimizer": name, "orthogonalize": run.placement.name if run.placement else None,
            "state_bytes_per_param": _bytes(state_abs) / n,
            "update_temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}


def bench_optimizers(cfg, preset: str, names: list[str], steps: int) -> list[dict]:
    """One row per optimizer; their updates are timed interleaved, ``steps`` times each."""
    import jax

    timed = {}
    rows = [{"preset": preset, **_optimizer_update(_run(cfg, preset, name), timed, name)} for name in names]
    with jax.set_mesh(_run(cfg, preset, "adamw").mesh):
        t = _medians(timed, steps)
    for row in rows:
        row["update_seconds"] = t[row["optimizer"]]
    timed.clear()
    return rows


def _preset_line(preset: str, row: dict) -> str:
    line = (f"{preset:<12} {row['params'] / 1e6:8.1f}M params  attention {row['attention']}  "
            f"compile {row['compile_seconds']:6.1f}s  "
            f"compiled memory {row['compiled_memory_bytes'] / 2**30:6.2f} GiB")
    if "step_seconds" in row:
        line += (f"  step {row['step_seconds'] * 1e3:8.1f} ms  {row['tokens_per_sec']:9.0f} tok/s  "
                 f"{row['achieved_flops_per_sec'] / 1e9:7.1f} GFLOP/s  MFU(measured) "
                 f"{100 * row['mfu_measured']:5.1f}% of {row['matmul_best_flops_per_sec'] / 1e9:.1f} GFLOP/s "
                 f"(load check: the matmul interleaved with the step "
                 f"{row['matmul_interleaved_flops_per_sec'] / 1e9:.1f} GFLOP/s)")
        if "mfu_datasheet" in row:
            line += f"  MFU(datasheet) {100 * row['mfu_datasheet']:5.1f}%"
        if "diagnostics_step_seconds" in row:
            line += (f"  diagnostics step {row['diagnostics_step_seconds'] * 1e3:.1f} ms: every "
                     f"{row['diagnostics_every']} steps {100 * row['diagnostics_overhead']:+.2f}% of step time")
        if "input_seconds" in row:
            line += (f"  input {row['input_seconds'] * 1e3:.1f} ms/batch, wait "
                     f"{row['input_wait_seconds'] * 1e3:.1f} ms/step")
    return line


def _optimizer_line(preset: str, row: dict) -> str:
    share = f"  ({100 * row['share_of_step']:.1f}% of an AdamW step)" if "share_of_step" in row else ""
    vs = f"  {row['vs_muon']:5.2f}x Muon" if "vs_muon" in row else ""
    return (f"{preset:<12} {row['optimizer']:<18} update {row['update_seconds'] * 1e3:8.2f} ms{share}{vs}  "
            f"state {row['state_bytes_per_param']:5.2f} B/param  update temp "
            f"{row['update_temp_bytes'] / 2**20:8.1f} MiB")


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    with user_errors():
        cfg = f.config  # a config file that failed to load raises when first read
        from train.build import setup_platform

        setup_platform(cfg)
        out = bench(cfg, presets=f.presets or [cfg.model.name], aot=f.aot, optimizers=f.optimizers, steps=f.steps,
                    matmuls=f.matmuls)
        if f.json:
            with open(f.json, "w") as file:
                json.dump(out, file, indent=2)
            print(f"wrote {f.json}")


def bench(cfg, *, presets: list[str], aot: list[str], optimizers: list[str], steps: int, matmuls: bool) -> dict:
    """Every number of the module docstring for ``presets`` (timed), ``aot`` (compiled only) and
    ``optimizers``, printed as it comes; returns them all."""
    import jax
    import jax.numpy as jnp

    from models import MESH_AXES
    from train.mesh import mesh_shape

    dev, dtype = jax.devices()[0], jnp.dtype(cfg.model.compute_dtype)
    out = {"device": f"{len(jax.devices())} x {dev.device_kind} ({dev.platform})",
           "mesh": dict(zip(MESH_AXES, mesh_shape(cfg.mesh, len(jax.devices())))), "batch_size": cfg.batch_size,
           "seq_len": cfg.seq_len, "compute_dtype": cfg.model.compute_dtype, "load_average_start": os.getloadavg()[0]}
    out.update(device_rates(dtype))
    print(f"device: {out['device']} | matmul {out['matmul_flops_per_sec'] / 1e9:.1f} GFLOP/s "
          f"({cfg.model.compute_dtype}) | memory {out['memory_bytes_per_sec'] / 1e9:.1f} GB/s | mesh {out['mesh']} | "
          f"load average {out['load_average_start']:.2f}")
    out["presets"] = [bench_preset(cfg, p, timed=p not in aot, steps=steps, matmuls=matmuls) for p in presets + aot]
    # MFU's denominator: the best rate the matmul reaches on its own, at the start or after the presets
    out["matmul_best_flops_per_sec"] = max(out["matmul_flops_per_sec"], device_rates(dtype)["matmul_flops_per_sec"])
    for row in out["presets"]:
        _add_mfu(row, out["matmul_best_flops_per_sec"])
        print(_preset_line(row["preset"], row), flush=True)
        if "matmuls" in row:
            print("\n".join(_matmul_lines(row)), flush=True)
    step_time = {r["preset"]: r.get("step_seconds") for r in out["presets"]}
    out["optimizers"] = []
    for preset in presets:
        rows = bench_optimizers(cfg, preset, optimizers, steps) if optimizers else []
        muon = {r["optimizer"]: r["update_seconds"] for r in rows}.get("muon")
        for row in rows:
            if step_time.get(preset):
                row["share_of_step"] = row["update_seconds"] / step_time[preset]
            if muon:
                row["vs_muon"] = row["update_seconds"] / muon
            out["optimizers"].append(row)
            print(_optimizer_line(preset, row), flush=True)
    out["load_average_end"] = os.getloadavg()[0]
    print(f"load average {out['load_average_end']:.2f}")
    return out


def _add_mfu(row: dict, matmul_best: float) -> None:
    """MFU against the best measured matmul rate, and the ceiling the step's matmuls allow (timed rows)."""
    if "achieved_flops_per_sec" in row:
        row["matmul_best_flops_per_sec"] = matmul_best
        row["mfu_measured"] = row["achieved_flops_per_sec"] / (matmul_best * row["matmul_devices"])
    if "matmuls" in row:
        row["matmul_seconds"] = sum(m["seconds"] for m in row["matmuls"])
        row["mfu_ceiling"] = row["model_flops_per_step"] / row["matmul_seconds"] / (matmul_best * row["matmul_devices"])


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags_or_exit)
