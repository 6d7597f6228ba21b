"""The accelerator configuration (bfloat16 compute, rematerialisation, FSDP + tensor parallelism) compiles
ahead of time against abstract shapes: nothing is allocated, so big presets can be checked on a CPU."""
import pytest

from configs.bench import get_config
from tools.bench import bench_preset


def _aot(preset, remat, vocab, seq_len, batch, mesh=(1, 4, 2)):
    cfg = get_config()
    cfg.update(batch_size=batch, seq_len=seq_len)
    cfg.model.update(vocab_size=vocab, compute_dtype="bfloat16", remat=remat)
    cfg.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
    return bench_preset(cfg, preset, timed=False)


@pytest.mark.parametrize("remat", ["full", "dots_no_batch"])
def test_bf16_remat_sharded_step_compiles(remat):
    row = _aot("cpu-small", remat, vocab=4096, seq_len=256, batch=8)
    assert row["compile_seconds"] > 0 and row["compiled_memory_bytes"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("preset,seq_len", [("gpt2-small", 1024), ("gpt3-xl", 2048)])
def test_published_presets_compile(preset, seq_len):
    row = _aot(preset, "full", vocab=50304, seq_len=seq_len, batch=8)
    assert row["params"] > 1e8
