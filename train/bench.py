"""``python -m train.bench``: throughput, MFU, memory and optimizer cost, measured in one process.

(a) the device: achieved matmul FLOP/s (n x n x n in the compute dtype) and memory bandwidth (a large
    elementwise copy, read + write bytes / s);
(b) per model preset: compile time, train-step time (median of repeated steps after warm-up), tokens/s,
    achieved FLOP/s from the analytic model FLOPs (``train.flops.flops_per_token``: 6(N - ctx*D) + 12*L*D*T
    per token), MFU against the datasheet peak (accelerators) and against the measured matmul rate, and
    peak memory (device statistics on accelerators, the compiled program's buffers on CPU); with ``--data``,
    the input pipeline: seconds to load and transfer one batch, and the input wait per step: the train
    loop's pattern (dispatch step k, load batch k + 1 while it runs, read step k - 1's metrics) fed by the
    pipeline, minus the same loop on one fixed batch;
(c) per optimizer: the update alone (jitted ``tx.update`` + apply on the preset's parameters, median),
    its share of the step, optimizer-state bytes per parameter and the update's temporary memory.

Timed callables that are compared are interleaved (a, b, a, b, ...): the step with the matmul that its MFU
is measured against, and the optimizers with each other, so that ratios hold on a machine whose load
varies. ``--aot`` presets are only lowered and compiled against abstract shapes (nothing is allocated):
the way to check on a CPU that GPT-3 XL's sharded train step compiles, and what it needs in memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="cpu-small", help="comma list of model presets to run")
    p.add_argument("--optimizers", default="adamw,muon,celo2,celo2-base,velo", help="comma list (factory names)")
    p.add_argument("--aot", default="", help="comma list of presets to compile only (abstract shapes)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--compute_dtype", default="float32")
    p.add_argument("--remat", default="none")
    p.add_argument("--mesh", default="1,1,-1", help="data,fsdp,tensor sizes (one may be -1)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    p.add_argument("--cpu_devices", type=int, default=1, help="simulated CPU devices (0: use the accelerators)")
    p.add_argument("--data", default="data_cache/shakespeare-bpe4096",
                   help="prepared dataset for the input-pipeline numbers (skipped if the dir does not exist)")
    p.add_argument("--json", default="", help="also write the numbers to this JSON file")
    return p.parse_args(argv)


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


def _setup(preset, opt_name, args, mesh, total_steps=100):
    from configs.base import base_config
    from models import model_config
    from optim.factory import make_optimizer

    model_cfg = model_config(preset, vocab_size=args.vocab_size, compute_dtype=args.compute_dtype,
                             remat=args.remat)
    opt_cfg = base_config().optimizer
    opt_cfg.name = opt_name
    if opt_name in ("celo2", "celo2-base", "velo"):
        opt_cfg.theta = weights_path(opt_name)
    return model_cfg, make_optimizer(opt_cfg, total_steps)


def weights_path(name: str) -> str:
    """Shipped weights of a learned optimizer, or (before any are shipped) freshly initialised ones written
    to a temporary file: speed, memory and sharding do not depend on the weights' values."""
    import os
    import tempfile

    import jax

    from optim.celo2 import WEIGHTS_DIR, init_theta, save_theta
    from optim.velo import init_velo_theta, save_velo_theta

    shipped = WEIGHTS_DIR / f"{name}.state"
    if shipped.exists():
        return str(shipped)
    path = os.path.join(tempfile.gettempdir(), f"init-{name}.state")
    if name == "velo":
        save_velo_theta(path, init_velo_theta(jax.random.key(0)))
    else:
        save_theta(path, init_theta(jax.random.key(0)))
    return path


def _abstract_batch(args, mesh):
    import jax
    import jax.numpy as jnp

    from train.step import batch_sharding

    sh = batch_sharding(mesh)
    shape = (args.batch_size, args.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=sh)
            for k in ("inputs", "targets", "segment_ids", "loss_mask")}


def _input_feed(args, mesh):
    """A blocking callable that loads the next training batch of ``args.data`` onto the mesh, or None."""
    import jax

    import data
    from train.step import batch_sharding

    if not args.data or not os.path.isdir(args.data):
        return None
    info = data.load_info(args.data)
    if info.vocab_size > args.vocab_size:
        raise ValueError(f"--data {args.data} has a vocabulary of {info.vocab_size} > --vocab_size {args.vocab_size}")
    it = data.train_iterator(info, seq_len=args.seq_len, global_batch_size=args.batch_size, seed=0)
    sharding = batch_sharding(mesh)
    return lambda: jax.block_until_ready(
        {k: jax.make_array_from_process_local_data(sharding, v) for k, v in next(it).items()})


def bench_preset(preset: str, args, mesh, run: bool) -> dict:
    import jax
    import numpy as np

    from models import count_params
    from train.flops import datasheet_peak, flops_per_token
    from train.state import init_state, make_layout
    from train.step import make_train_step

    model_cfg, opt = _setup(preset, "adamw", args, mesh)
    layout = make_layout(model_cfg, opt.tx, mesh)
    step = make_train_step(layout, opt.tx, opt.schedule, mesh, microbatches=1, seed=0, dropout=False)
    n_params = count_params(model_cfg)
    tokens = args.batch_size * args.seq_len
    flops = flops_per_token(n_params, model_cfg.n_layers, model_cfg.d_model, model_cfg.ctx, args.seq_len) * tokens
    row = {"preset": preset, "params": n_params, "tokens_per_step": tokens, "model_flops_per_step": flops}
    with jax.set_mesh(mesh):
        t = time.perf_counter()
        compiled = step.lower(layout.abstract, _abstract_batch(args, mesh)).compile()
        row["compile_seconds"] = time.perf_counter() - t
    mem = compiled.memory_analysis()
    row["compiled_memory_bytes"] = int(mem.argument_size_in_bytes + mem.temp_size_in_bytes)
    if not run:
        return row
    state = init_state(model_cfg, opt.tx, layout, seed=0)
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, args.vocab_size, (args.batch_size, args.seq_len), dtype=np.int32),
             "segment_ids": np.ones((args.batch_size, args.seq_len), np.int32),
             "loss_mask": np.ones((args.batch_size, args.seq_len), np.float32)}
    batch["targets"] = np.roll(batch["inputs"], -1, axis=1)
    batch = {k: jax.device_put(v, layout_batch) for k, v, layout_batch in
             ((k, v, _abstract_batch(args, mesh)[k].sharding) for k, v in batch.items())}
    holder = {"state": state}

    def one_step():
        holder["state"], m = compiled(holder["state"], batch)
        m["loss"].block_until_ready()

    matmul, matmul_flops = _matmul(jax.numpy.dtype(args.compute_dtype))
    timed = {"step": one_step, "matmul": matmul}
    feed = _input_feed(args, mesh)
    if feed is not None:
        loop_steps = 4

        def loop(load_batch):  # train.loop's pattern, timed over loop_steps steps
            def run():
                pending, next_batch = None, load_batch()
                for _ in range(loop_steps):
                    holder["state"], m = compiled(holder["state"], next_batch)
                    next_batch = load_batch()
                    if pending is not None:
                        jax.device_get(pending)
                    pending = m
                jax.device_get(pending)
            return run

        timed.update(input=feed, loop=loop(feed), loop_fixed_batch=loop(lambda: batch))
    t = _medians(timed, args.steps)
    dt = t["step"]
    peak_sheet = datasheet_peak(jax.devices()[0])
    # simulated CPU devices share the host's cores: one matmul rate; accelerators: one per device
    peak_matmul = matmul_flops / t["matmul"] * (len(mesh.devices.flat) if peak_sheet else 1)
    row.update(step_seconds=dt, tokens_per_sec=tokens / dt, achieved_flops_per_sec=flops / dt,
               matmul_flops_per_sec=matmul_flops / t["matmul"], mfu_measured=flops / dt / peak_matmul)
    if feed is not None:
        row.update(input_seconds=t["input"],
                   input_wait_seconds=max(0.0, t["loop"] - t["loop_fixed_batch"]) / loop_steps)
    if peak_sheet:
        row["mfu_datasheet"] = flops / dt / (peak_sheet * mesh.devices.size)
        stats = jax.devices()[0].memory_stats() or {}
        row["peak_memory_bytes"] = stats.get("peak_bytes_in_use")
    holder.clear()
    return row


def bench_optimizers(preset: str, names: list[str], args, mesh) -> list[dict]:
    """One row per optimizer; their updates are timed interleaved."""
    import jax
    import optax

    from train.state import make_layout

    rows, timed, holders = [], {}, []
    for name in names:
        model_cfg, opt = _setup(preset, name, args, mesh)
        layout = make_layout(model_cfg, opt.tx, mesh)
        params_abs, state_abs = layout.abstract.params, layout.abstract.opt_state

        def update(params, grads, opt_state, tx=opt.tx):
            updates, opt_state = tx.update(grads, opt_state, params, loss=0.0)
            return optax.apply_updates(params, updates), opt_state

        fn = jax.jit(update, donate_argnums=(0, 2))
        with jax.set_mesh(mesh):
            compiled = fn.lower(params_abs, params_abs, state_abs).compile()
            leaves, treedef = jax.tree.flatten(params_abs)

            def make(seed):
                arrays = [0.02 * jax.random.normal(jax.random.key(seed + 7 * i), a.shape, a.dtype)
                          for i, a in enumerate(leaves)]
                return jax.device_put(jax.tree.unflatten(treedef, arrays), layout.shardings.params)

            params, grads = make(0), make(1)
            opt_state = jax.jit(opt.tx.init, out_shardings=layout.shardings.opt_state)(params)
        holder = {"p": params, "s": opt_state}
        holders.append(holder)

        def one(compiled=compiled, holder=holder, grads=grads):
            holder["p"], holder["s"] = compiled(holder["p"], grads, holder["s"])
            jax.block_until_ready(holder["p"])

        timed[name] = one
        n = sum(x.size for x in jax.tree.leaves(params_abs))
        rows.append({"preset": preset, "optimizer": name, "state_bytes_per_param": _bytes(state_abs) / n,
                     "update_temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)})
    with jax.set_mesh(mesh):
        t = _medians(timed, args.steps)
    for row in rows:
        row["update_seconds"] = t[row["optimizer"]]
    holders.clear()
    return rows


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    import jax

    if args.cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    import jax.numpy as jnp

    from train.mesh import build_mesh

    sizes = [int(s) for s in args.mesh.split(",")]
    mesh = build_mesh(dict(zip(("data", "fsdp", "tensor"), sizes)))
    dev = jax.devices()[0]
    out = {"device": f"{len(jax.devices())} x {dev.device_kind} ({dev.platform})", "mesh": dict(mesh.shape),
           "batch_size": args.batch_size, "seq_len": args.seq_len, "compute_dtype": args.compute_dtype,
           "load_average_start": os.getloadavg()[0]}
    out.update(device_rates(jnp.dtype(args.compute_dtype)))
    print(f"device: {out['device']} | matmul {out['matmul_flops_per_sec'] / 1e9:.1f} GFLOP/s "
          f"({args.compute_dtype}) | memory {out['memory_bytes_per_sec'] / 1e9:.1f} GB/s | mesh {out['mesh']} | "
          f"load average {out['load_average_start']:.2f}")
    presets = [p for p in args.presets.split(",") if p]
    aot = [p for p in args.aot.split(",") if p]
    out["presets"] = []
    for preset in presets + aot:
        row = bench_preset(preset, args, mesh, run=preset not in aot)
        out["presets"].append(row)
        line = (f"{preset:<12} {row['params'] / 1e6:8.1f}M params  compile {row['compile_seconds']:6.1f}s  "
                f"compiled memory {row['compiled_memory_bytes'] / 2**30:6.2f} GiB")
        if "step_seconds" in row:
            line += (f"  step {row['step_seconds'] * 1e3:8.1f} ms  {row['tokens_per_sec']:9.0f} tok/s  "
                     f"{row['achieved_flops_per_sec'] / 1e9:7.1f} GFLOP/s  MFU(measured) "
                     f"{100 * row['mfu_measured']:5.1f}% of {row['matmul_flops_per_sec'] / 1e9:.1f} GFLOP/s")
            if "mfu_datasheet" in row:
                line += f"  MFU(datasheet) {100 * row['mfu_datasheet']:5.1f}%"
            if "input_seconds" in row:
                line += (f"  input {row['input_seconds'] * 1e3:.1f} ms/batch, wait "
                         f"{row['input_wait_seconds'] * 1e3:.1f} ms/step")
        print(line, flush=True)
    out["optimizers"] = []
    step_time = {r["preset"]: r.get("step_seconds") for r in out["presets"]}
    names = [o for o in args.optimizers.split(",") if o]
    for preset in presets:
        rows = bench_optimizers(preset, names, args, mesh) if names else []
        muon = {r["optimizer"]: r["update_seconds"] for r in rows}.get("muon")
        for row in rows:
            if step_time.get(preset):
                row["share_of_step"] = row["update_seconds"] / step_time[preset]
            if muon:
                row["vs_muon"] = row["update_seconds"] / muon
            out["optimizers"].append(row)
            share = f"  ({100 * row['share_of_step']:.1f}% of an AdamW step)" if "share_of_step" in row else ""
            vs = f"  {row['vs_muon']:5.2f}x Muon" if "vs_muon" in row else ""
            print(f"{preset:<12} {row['optimizer']:<11} update {row['update_seconds'] * 1e3:8.2f} ms{share}{vs}  "
                  f"state {row['state_bytes_per_param']:5.2f} B/param  update temp "
                  f"{row['update_temp_bytes'] / 2**20:8.1f} MiB", flush=True)
    out["load_average_end"] = os.getloadavg()[0]
    print(f"load average {out['load_average_end']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
