"""tools.plan: topology names, the analytic memory model, fit suggestions, and the command on a TPU topology
(compiled deviceless through libtpu, in a subprocess) and on GPUs (analytic)."""
import importlib.util
import json
import pickle
import subprocess
import sys

import pytest

from configs.base import base_config
from train.build import build_run
from train.config import load_config
from tools.gpu_compile import plugin_installed
from tools.memory import estimate
from tools.plan import candidates, make_plan, tpu_topology
from tools.plan_table import table_line

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA_PLUGIN = plugin_installed()


@pytest.fixture
def analytic_gpu_plans(monkeypatch):
    """GPU plans as without JAX's CUDA plugin (the analytic estimate), also where it is installed."""
    monkeypatch.setattr("tools.gpu_compile.plugin_installed", lambda: False)


@pytest.mark.parametrize("name,expected", [
    ("v5p-8", ("v5p", "v5p:2x2x1", 4)), ("v5p-128", ("v5p", "v5p:4x4x4", 64)), ("v4-32", ("v4", "v4:2x2x4", 16)),
    ("v5e-256", ("v5e", "v5e:16x16", 256)), ("v5litepod-16", ("v5e", "v5e:4x4", 16)),
    ("v6e-64", ("v6e", "v6e:8x8", 64)), ("v5p:2x4x4", ("v5p", "v5p:2x4x4", 32)),
])
def test_topology_names(name, expected):
    assert tpu_topology(name) == expected


@pytest.mark.parametrize("name", ["v7q-8", "v5p-12", "h100", "v5p:4x"])
def test_bad_topology_names_say_what_is_valid(name):
    with pytest.raises(ValueError, match="topology"):
        tpu_topology(name)


def _cfg(model="gpt3-xl", batch=512, seq=2048, remat="full", microbatches=1, loss_chunk=0, optimizer="adamw"):
    c = base_config()
    c.model.update(name=model, vocab_size=50257, compute_dtype="bfloat16", remat=remat)
    c.update(batch_size=batch, seq_len=seq, microbatches=microbatches, loss_chunk=loss_chunk, cpu_devices=0)
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.optimizer.name = optimizer
    return load_config(c)


def test_state_bytes_are_exact_shards_of_the_layout():
    """64 devices that are not here (fsdp=64): every matrix is split 64 ways, vectors are replicated (float32);
    AdamW keeps two moments shaped and sharded like the params, and a step count."""
    import jax

    run = build_run(_cfg(), 64, "gpu")
    est = estimate(run)
    expected = sum(4 * p.size // (64 if p.ndim >= 2 else 1) for p in jax.tree.leaves(run.layout.abstract.params))
    assert est["params"] == expected and expected < 4 * run.n_params / 60
    assert 0 <= est["optimizer_state"] - 2 * expected <= 64


def test_activations_fall_with_remat_chunked_loss_and_microbatches():
    run = build_run(_cfg(remat="none"), 64, "gpu")
    totals = [estimate(run, r)["layers"] + estimate(run, r)["recompute"] for r in ("none", "dots_no_batch", "full")]
    assert totals[0] > totals[1] > totals[2]
    assert estimate(build_run(_cfg(loss_chunk=256), 64, "gpu"))["logits"] == estimate(run)["logits"] / 8
    micro4, whole = (estimate(build_run(_cfg(microbatches=k), 64, "gpu"))["layers"] for k in (4, 1))
    assert micro4 == whole / 4


def test_candidates_double_microbatches_then_recompute_more():
    got = [change for change, _ in candidates(_cfg(batch=64, remat="dots_no_batch"), n_shards=16)]
    assert got == [{"microbatches": 2, "remat": "dots_no_batch"}, {"microbatches": 4, "remat": "dots_no_batch"},
                   {"microbatches": 1, "remat": "full"}, {"microbatches": 2, "remat": "full"},
                   {"microbatches": 4, "remat": "full"}]


def test_gpu_plan_that_does_not_fit_names_a_change_that_does(analytic_gpu_plans):
    """GPT-3 XL without remat at 64 sequences per A100 does not fit in 80 GiB; the suggestion fits (estimate)."""
    plan = make_plan(_cfg(remat="none"), gpu="a100", gpus=8)
    assert not plan["fits"] and plan["analytic"]["total"] > plan["target"]["memory_per_device"]
    s = plan["suggestion"]
    assert s["estimated_total"] <= plan["target"]["memory_per_device"]
    changed = make_plan(_cfg(remat=s["change"]["remat"], microbatches=s["change"]["microbatches"]), gpu="a100", gpus=8)
    assert changed["fits"]


def _plan_cli(*args, env_extra=None, timeout=600):
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "tools.plan", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_gpu_command_prints_an_estimate_and_writes_json(tmp_path):
    """Without JAX's CUDA plugin (shadowed here by an empty ``jax_plugins``): the analytic estimate, with the
    line that says how to compile instead."""
    (tmp_path / "jax_plugins").mkdir()
    (tmp_path / "jax_plugins" / "__init__.py").write_text("")
    out = tmp_path / "plan.json"
    r = _plan_cli("--config", "configs/gpt2_small.py", "--gpu", "h100", "--gpus", "8", "--json", str(out),
                  env_extra={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "analytic estimate" in r.stdout and "fits" in r.stdout
    assert "note: compiling for GPUs needs JAX's CUDA plugin: pip install -e '.[gpu-plan]'" in r.stdout
    plan = json.loads(out.read_text())
    assert plan["target"]["chip"] == "h100" and plan["config"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    r = _plan_cli("--config", "configs/gpt2_small.py", "--gpu", "h100", "--save", str(tmp_path / "step.jaxexe"),
                  env_extra={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 2 and "--save needs a compiled program, and nothing is compiled here" in r.stderr


@pytest.mark.parametrize("args,message", [
    ((), "give one target"), (("--gpu", "v100"), "is not one of a100, h100, h200"),
    (("--gpu", "h100", "--gpus", "6", "--config.batch_size=8"), "not divisible by data*fsdp=6"),
])
def test_bad_targets_end_in_one_line(args, message):
    r = _plan_cli("--config", "configs/gpt2_small.py", *args)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 2, r.stderr


def test_missing_libtpu_says_how_to_install_it(tmp_path):
    """A ``libtpu`` that cannot be imported (shadowed here) ends in the install command, not a traceback."""
    (tmp_path / "libtpu.py").write_text("raise ImportError('no libtpu here')\n")
    r = _plan_cli("--config", "configs/gpt2_small.py", "--topology", "v5p-8", env_extra={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 2 and "pip install -e '.[tpu]'" in r.stderr, r.stderr


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_small_model_compiles_for_a_tpu_topology(tmp_path):
    """The real train step of a small model compiled for 4 v5p chips: XLA's FLOPs agree with the analytic count,
    the state in the compiled arguments is the layout's, and the analytic estimate is within 2x of XLA's."""
    out = tmp_path / "plan.json"
    r = _plan_cli("--config", "configs/default.py", "--topology", "v5p:2x2x1", "--config.mesh.data=1",
                  "--config.mesh.fsdp=-1", "--config.mesh.tensor=1", "--config.model.vocab_size=4096",
                  "--config.optimizer.name=muon", "--json", str(out), "--save", str(tmp_path / "step.jaxexe"))
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    key = pickle.load(open(tmp_path / "step.jaxexe", "rb"))["key"]  # for a run on those chips (not here)
    assert key["platform"] == "tpu" and key["devices"] == 4 and key["optimizer"]["name"] == "muon"
    assert f"wrote the compiled train step to {tmp_path / 'step.jaxexe'}" in r.stdout
    assert plan["fits"] and plan["target"]["devices"] == 4 and plan["config"]["optimizer"] == "muon"
    assert 0.95 < plan["xla_flops_per_step"] / plan["model_flops_per_step"] < 1.3
    assert plan["per_device"]["params"] == plan["analytic"]["params"]
    assert 0.5 < plan["analytic"]["total"] / plan["per_device"]["total"] < 2.0
    assert 0 < plan["projected_mfu"] < 1 and "not a measurement" in r.stdout
    # Newton-Schulz dealt out over the 4 chips (optimizer.orthogonalize auto), said; the update alone compiled
    assert plan["config"]["orthogonalize"] == "distributed" and "Newton-Schulz distributed" in r.stdout
    update = plan["optimizer_update"]
    assert 0 < update["xla_flops_per_device"] < plan["xla_flops_per_step"] / 4 and update["temporary"] > 0
    assert "optimizer update compiled alone" in r.stdout
    row = table_line("cpu-small muon", "v5p:2x2x1", plan)  # its row in the benchmarks file's table
    assert "| yes |" in row and f"{plan['projected_step_seconds']:.3f}" in row


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_a_run_over_the_chips_hbm_gets_a_change_that_compiles_within_it(tmp_path):
    """XLA's TPU compiler refuses a program over HBM (1024 rows of 50304 float32 logits per v5e chip); the plan
    reports XLA's figures, and --search compiles the suggested change, which fits."""
    out = tmp_path / "plan.json"
    r = _plan_cli("--config", "configs/cpu_tiny.py", "--topology", "v5e:2x2", "--config.mesh.data=1",
                  "--config.mesh.fsdp=-1", "--config.mesh.tensor=1", "--config.batch_size=2048",
                  "--config.seq_len=256", "--search", "--json", str(out))
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    assert not plan["fits"] and plan["out_of_hbm"]["temporary"] > plan["out_of_hbm"]["hbm"]
    assert "DOES NOT FIT" in r.stdout and "XLA refused the program" in r.stdout
    s = plan["suggestion"]
    assert s["change"]["microbatches"] > 1 and s["compiled_total"] <= plan["target"]["memory_per_device"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_gpt2_small_preset_plans_on_v5p_8(tmp_path):
    out = tmp_path / "plan.json"
    r = _plan_cli("--config", "configs/gpt2_small.py", "--topology", "v5p-8", "--json", str(out), timeout=3600)
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    assert plan["config"]["params"] > 1.2e8 and plan["per_device"]["temporary"] > 0
    assert 0.95 < plan["xla_flops_per_step"] / plan["model_flops_per_step"] < 1.6


@pytest.mark.parametrize("preset", ["default", "cpu_tiny", "gpt2_small", "gpt3_xl", "compare_cpu",
                                    "compare_gpt2_small", "compare_gpt3_xl", "paper_gpt2_small", "paper_gpt3_xl",
                                    "compare_paper_gpt3_xl"])
def test_every_preset_plans_for_gpus(preset, analytic_gpu_plans):
    """Every shipped run config gets a plan (analytic, on H100s: 8, or as many as its mesh names), with its
    own model and batch."""
    import importlib

    import math

    cfg = importlib.import_module(f"configs.{preset}").get_config()
    sizes = [cfg.mesh[a] for a in ("data", "fsdp", "tensor")]
    plan = make_plan(cfg, gpu="h100", gpus=8 if -1 in sizes else math.prod(sizes))
    assert plan["config"]["model"] == cfg.model.name and plan["config"]["batch_size"] == cfg.batch_size
    assert plan["analytic"]["total"] > plan["analytic"]["params"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="JAX's CUDA plugin is not installed (pip install -e '.[gpu-plan]')")
@pytest.mark.parametrize("attention", ["xla", "pallas_gpu", "cudnn"])
def test_small_model_compiles_for_eight_h100s(attention, tmp_path):
    """cpu-tiny's real train step compiled for 1x1x8 H100s without a GPU: per-device memory from the compiled
    program, XLA's FLOPs (plus the fused kernel's) near the model's, the Pallas or cuDNN kernels in the executable
    (cuDNN: causal only, bfloat16; JAX's cuDNN version check answered with the target's where cuDNN is absent)."""
    out = tmp_path / "plan.json"
    cudnn = ["--config.model.document_mask=False", "--config.model.compute_dtype=bfloat16"] if attention == "cudnn" else []
    args = ("--config", "configs/cpu_tiny.py", "--gpu", "h100", "--gpus", "8", "--config.data.dir=", *cudnn,
            f"--config.model.attention={attention}")
    save = ("--save", str(tmp_path / "step.jaxexe"))
    r = _plan_cli(*args, "--json", str(out), *(save if attention != "cudnn" else ()))
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    if attention == "cudnn":  # jax does not serialize its custom partitioning: one line saying so
        saving = _plan_cli(*args, *save)
        assert saving.returncode == 2 and "error: this compiled program cannot be saved" in saving.stderr, saving.stderr
    else:
        key = pickle.load(open(tmp_path / "step.jaxexe", "rb"))["key"]
        assert key["device_kind"] == "NVIDIA H100 80GB HBM3" and key["devices"] == 8 and key["processes"] == 1
    assert plan["target"]["topology"] == "1x1x8" and plan["fits"] and "compiled for 8 x h100 GPUs" in r.stdout
    assert plan["per_device"]["temporary"] > 0 and plan["per_device"]["params"] == plan["analytic"]["params"]
    flops = plan["xla_flops_per_step"] + plan["kernel_flops_not_in_xla"]
    assert 0.95 < flops / plan["model_flops_per_step"] < 1.3
    assert ("pallas mha_forward" in plan["kernels"]) == (attention == "pallas_gpu")
    assert ("__cudnn$fmhaSoftmaxBackward" in plan["kernels"]) == (attention == "cudnn")
    if attention == "cudnn":
        assert "cuDNN attention's support and workspace" in r.stdout  # what a compile without a GPU cannot check
    assert plan["lower_bound_step_seconds"] > 0 and "a lower bound, not an estimate" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="JAX's CUDA plugin is not installed (pip install -e '.[gpu-plan]')")
def test_a_gpu_program_over_the_memory_does_not_fit(tmp_path):
    """XLA compiles a GPU program larger than the GPU (it only warns): the plan decides, and says so."""
    out = tmp_path / "plan.json"
    r = _plan_cli("--config", "configs/cpu_tiny.py", "--gpu", "a100", "--gpus", "8", "--config.data.dir=",
                  "--config.model.attention=xla", "--config.batch_size=8192", "--config.seq_len=256",
                  "--json", str(out))
    assert r.returncode == 0, r.stderr
    plan = json.loads(out.read_text())
    assert plan["per_device"]["total"] > plan["target"]["memory_per_device"] and not plan["fits"]
    assert "DOES NOT FIT" in r.stdout and "Pallas kernels for an A100" in r.stdout
