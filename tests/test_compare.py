import json
import os

import pytest

import data
from configs.compare import compare_fields
from configs.cpu_tiny import get_config
from tools.compare import Comparison, steps_to_reach, verdict, welch_interval


def small_comparison(workdir, data_dir):
    cfg = get_config()
    cfg.workdir, cfg.data.dir = str(workdir), str(data_dir)
    cfg.mesh.update(dict(data=8, fsdp=1, tensor=1))
    cfg.update(dict(steps=4, batch_size=8, seq_len=32, eval_every=2, log_every=2, checkpoint_every=4,
                    eval_batches=2))
    cfg.optimizer.warmup_steps = 1
    cfg.compare = compare_fields("adamw,muon", seeds=2, lrs={"adamw": "1e-3,1e-2", "muon": "2e-2"})
    return cfg


def test_comparison_writes_results_and_is_resumable(tmp_path, shakespeare, capsys):
    cfg = small_comparison(tmp_path / "cmp", shakespeare)
    results = Comparison(cfg).execute()
    root = tmp_path / "cmp"
    for name in ("results.json", "summary.md", "curves.png", "curves_wallclock.png", "sweep.png"):
        assert os.path.getsize(root / name) > 0, name
    saved = json.load(open(root / "results.json"))
    for opt in ("adamw", "muon"):
        e = saved["optimizers"][opt]
        assert {float(lr) for lr in e["sweep"]} == {float(lr) for lr in cfg.compare.lrs[opt].split(",")}
        assert e["best_lr"] == float(min(e["sweep"], key=e["sweep"].get))
        assert len(e["seed_losses"]) == 2 and e["tokens"] == 4 * 8 * 32
        assert abs(e["mean"] - sum(e["seed_losses"]) / 2) < 1e-9
        info = data.load_info(shakespeare)
        assert e["seed_bpb"] == [info.bits_per_byte(loss) for loss in e["seed_losses"]]
    assert results["optimizers"]["adamw"]["speedup_vs_adamw"] in (None, 1.0)
    adamw = results["optimizers"]["adamw"]
    if adamw["steps_to_adamw_loss"]:  # AdamW's seed-mean curve reaches its own mean final loss
        assert adamw["seconds_to_adamw_loss"] > 0 and abs(adamw["wall_speedup_vs_adamw"] - 1.0) < 1e-9
    summary = open(root / "summary.md").read()
    assert "| adamw |" in summary and "| muon |" in summary and "Verdict rule" in summary
    assert saved["optimizers"]["adamw"]["best_lr_at_grid_edge"]  # 2 rates: the best is at an edge
    assert not saved["optimizers"]["muon"]["best_lr_at_grid_edge"]  # a single rate is no grid
    assert "edge of its grid, widen the sweep:** adamw" in summary and "epochs of the training split" in summary
    assert saved["tokenizer"]["source"] == "trained" and "Tokenizer: trained (sentencepiece, 4,096 tokens" in summary
    runs = sorted(os.listdir(root / "runs"))
    assert len(runs) == 5 and all(os.path.exists(root / "runs" / r / "tensorboard") for r in runs)

    # rerunning is a no-op: every run is recorded as done, nothing trains again
    mtimes = {r: os.path.getmtime(root / "runs" / r / "metrics.jsonl") for r in runs}
    capsys.readouterr()
    Comparison(cfg).execute()
    assert " ===\n" not in capsys.readouterr().out
    assert mtimes == {r: os.path.getmtime(root / "runs" / r / "metrics.jsonl") for r in runs}

    # runs made with other settings are not reused
    cfg.steps = 5
    with pytest.raises(ValueError, match="other settings than this comparison's \\(steps: run 4, comparison 5\\)"):
        Comparison(cfg).execute()
    cfg.steps = 4

    # a run made with another tokenizer is a mismatched setting (its data dir prepared again under the same path)
    done_file = root / "runs" / runs[1] / "done.json"
    done = json.load(open(done_file))
    json.dump({**done, "tokenizer": {**done["tokenizer"], "source": "gpt2", "sha256": "0" * 64}}, open(done_file, "w"))
    with pytest.raises(ValueError, match="tokenizer: run 'gpt2', comparison 'trained'"):
        Comparison(cfg).execute()
    json.dump(done, open(done_file, "w"))

    # a run killed mid-way is resumed, and only the unfinished run trains
    os.remove(root / "runs" / runs[0] / "done.json")
    Comparison(cfg).execute()
    out = capsys.readouterr().out
    assert out.count(" ===\n") == 1 and f"=== {runs[0]} ===" in out


def test_steps_to_reach_interpolates_and_verdict_respects_noise():
    curve = [(10, 5.0), (20, 4.0), (30, 3.0)]
    assert steps_to_reach(curve, 3.5) == 25.0
    assert steps_to_reach(curve, 6.0) == 10.0 and steps_to_reach(curve, 2.0) is None
    ref = {"seed_losses": [4.0, 4.05, 3.95]}  # mean 4, std 0.05
    assert verdict({"seed_losses": [3.8, 3.85, 3.75]}, ref).startswith("better")
    assert verdict({"seed_losses": [3.95, 4.0, 3.9]}, ref).startswith("not distinguishable")
    assert verdict({"seed_losses": [4.3, 4.4, 4.2]}, ref).startswith("worse")
    assert verdict({"seed_losses": [3.0]}, ref) == "one seed, no verdict"


def test_welch_interval_matches_the_textbook_formula():
    from scipy import stats

    x, y = [3.1, 3.3, 3.2, 3.6], [3.5, 3.9, 3.7]
    diff, low, high = welch_interval(x, y)
    ref = stats.ttest_ind(x, y, equal_var=False).confidence_interval(0.95)
    assert abs(diff - (sum(x) / 4 - sum(y) / 3)) < 1e-12
    assert abs(low - ref.low) < 1e-9 and abs(high - ref.high) < 1e-9


def test_plan_run_and_report_on_a_half_done_comparison(tmp_path, shakespeare):
    from tools.compare import plan

    cfg = small_comparison(tmp_path / "cmp", shakespeare)
    cfg.diagnostics_every, cfg.compare.diagnostics = 2, "update_ratio, update_cos/attn_qkv.01"
    comp = Comparison(cfg)
    overrides = {"workdir": str(tmp_path / "cmp"), "steps": 4}
    rows = plan(comp, "configs/compare_cpu.py", overrides)
    assert [r["name"] for r in rows] == ["adamw_lr0.001_s0", "adamw_lr0.01_s0", "muon_lr0.02_s0"]  # no seeds yet
    assert all(r["status"] == "pending" for r in rows)
    assert rows[0]["command"].endswith("--config.steps=4 run adamw_lr0.001_s0")
    assert (f"--config.steps=4 --config.workdir={tmp_path}/cmp/runs/adamw_lr0.001_s0 --config.seed=0 "
            f"--config.optimizer.name=adamw --config.optimizer.lr=0.001") in rows[0]["train_command"]
    assert json.load(open(tmp_path / "cmp" / "plan.json")) == rows

    comp.run("muon", 0.02, 0)  # `run muon_lr0.02_s0`: muon's one-rate sweep is done, its seed run is planned
    names = {r["name"]: r["status"] for r in plan(comp, "configs/compare_cpu.py", overrides)}
    assert names["muon_lr0.02_s0"] == "done" and names["muon_lr0.02_s1"] == "pending"
    results = comp.report()  # never trains: reports what is there
    assert results["optimizers"]["adamw"]["unfinished"] == ["adamw_lr0.001_s0", "adamw_lr0.01_s0"]
    muon = results["optimizers"]["muon"]
    assert muon["seeds"] == [0] and muon["unfinished"] == ["muon_lr0.02_s1"]
    summary = open(tmp_path / "cmp" / "summary.md").read()
    assert "| adamw | – | sweep unfinished |" in summary and "Unfinished runs, not counted (3)" in summary
    assert not os.path.exists(tmp_path / "cmp" / "runs" / "adamw_lr0.001_s0")
    for name in ("diagnostics_update_ratio.png", "diagnostics_update_cos_attn_qkv.01.png"):
        assert os.path.getsize(tmp_path / "cmp" / name) > 10_000, name


def test_diagnostics_to_plot_are_checked(tmp_path, shakespeare):
    cfg = small_comparison(tmp_path / "cmp", shakespeare)
    cfg.compare.diagnostics = "update_ratio"
    with pytest.raises(ValueError, match="diagnostics_every steps, which is 0 \\(off\\): add --config.diagnostics_every=N"):
        Comparison(cfg)
    cfg.diagnostics_every, cfg.compare.diagnostics = 10, "update_size"
    with pytest.raises(ValueError, match="'update_size' is not a diagnostic: the metrics are grad_norm, "):
        Comparison(cfg)


def test_train_seconds_sum_step_times_and_leave_out_compilation(tmp_path):
    from infra.metrics import MetricsLogger
    from tools.compare import _seconds_at, _train_seconds

    log = MetricsLogger(str(tmp_path), 10, 0, progress=False)
    log.write(10, {"loss": 5.0})  # first row after a start: its time includes compilation, no step_time
    log.write(20, {"loss": 4.0, "step_time": 0.5})
    log.write(20, {"eval_loss": 4.1})
    log.write(30, {"loss": 3.0, "step_time": 1.5})
    log.close()
    steps, seconds = _train_seconds(str(tmp_path))
    assert steps == [0, 10, 20, 30]
    assert seconds == [0.0, 10.0, 15.0, 30.0]  # the first 10 steps at the median step time, 1.0 s
    assert _seconds_at(str(tmp_path), 25) == 22.5
