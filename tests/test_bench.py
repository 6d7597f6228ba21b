"""tools.bench's matmul ceiling: the step's matmuls add up to the model's FLOPs, and the bench reports them (and the
diagnostics step's time); optimizers timed per Newton-Schulz placement."""
import json
import subprocess
import sys

import pytest

from models import count_params, model_config
from train.flops import flops_per_token
from tools.matmul_ceiling import step_products

# model FLOPs count every parameter but the positions 6 times per token; the matmuls leave out the LayerNorm
# scales and shifts and the biases, 13 D per layer (cpu-small: 0.3% of its parameters)
FLOP_TOLERANCE = 0.01


@pytest.mark.parametrize("preset,seq_len,vocab", [("cpu-small", 256, 4096), ("gpt2-small", 1024, 50304)])
def test_step_matmuls_add_up_to_the_model_flops(preset, seq_len, vocab):
    cfg, batch = model_config(preset, vocab_size=vocab), 4
    model = flops_per_token(count_params(cfg), cfg.ctx * cfg.d_model, cfg.n_layers, cfg.d_model, seq_len) * batch * seq_len
    products = step_products(cfg.n_layers, cfg.d_model, cfg.n_heads, vocab, batch, seq_len)
    assert abs(sum(p.flops for p in products) / model - 1) < FLOP_TOLERANCE
    assert len(products) == 4 * 3 + 6 + 3  # four projections x (forward, dx, dW), attention's six, the head's three


def test_bench_reports_the_matmul_ceiling(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tools.bench", "--presets", "cpu-tiny", "--optimizers", "",
                          "--config.data.dir=", "--config.batch_size=2", "--config.seq_len=64", "--steps", "1",
                          "--config.diagnostics_every=10", "--matmuls", "--json", str(tmp_path / "b.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "attention q k^T" in out.stdout and "MFU ceiling with nothing else taking time" in out.stdout
    assert "diagnostics step" in out.stdout and "every 10 steps" in out.stdout
    row = json.loads((tmp_path / "b.json").read_text())["presets"][0]
    assert len(row["matmuls"]) == 21 and 0 < row["mfu_ceiling"] and row["matmul_seconds"] > 0
    assert row["diagnostics_step_seconds"] > 0 and row["diagnostics_every"] == 10


def test_bench_matmuls_need_one_device():
    out = subprocess.run([sys.executable, "-m", "tools.bench", "--presets", "cpu-tiny", "--optimizers", "",
                          "--config.data.dir=", "--config.cpu_devices=2", "--config.mesh.data=2",
                          "--config.mesh.tensor=1", "--config.batch_size=2", "--config.seq_len=64", "--steps", "1",
                          "--matmuls"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "--matmuls times the whole step's matmuls on one device" in out.stderr


def test_bench_times_an_optimizer_per_newton_schulz_placement():
    from configs.bench import get_config
    from tools.bench import bench_optimizers

    cfg = get_config()
    cfg.cpu_devices = 8
    cfg.mesh.update(dict(data=2, fsdp=2, tensor=2))
    rows = bench_optimizers(cfg, "cpu-tiny", ["muon:replicated", "muon:distributed", "adamw"], steps=1)
    assert [(r["optimizer"], r["orthogonalize"]) for r in rows] == [
        ("muon:replicated", "replicated"), ("muon:distributed", "distributed"), ("adamw", None)]
    assert all(r["update_seconds"] > 0 for r in rows)
    assert rows[0]["state_bytes_per_param"] == rows[1]["state_bytes_per_param"]  # the same state either way
