"""The SLURM and TPU-pod launch scripts: shellcheck-clean, and their dry runs print the right command."""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/slurm.sbatch", "launch/tpu_pod.sh", "launch/slurm_compare.sh", "launch/tpu_compare.sh"]
ARGS = ["--config", "configs/gpt3_xl.py", "--config.workdir=/shared/runs/gpt3 xl"]


def _dry_run(script, **env):
    full_env = {**os.environ, "DRY_RUN": "1", **env}
    out = subprocess.run(["bash", os.path.join(REPO, script), *ARGS], env=full_env, capture_output=True,
                         text=True, check=True).stdout
    return out.strip().splitlines()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    proc = subprocess.run(["shellcheck", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_slurm_dry_run_runs_one_multiprocess_trainer_per_node():
    lines = _dry_run("launch/slurm.sbatch")
    assert lines[0] == "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in lines[1]
    assert lines[2].startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=1 python -m train --config")
    assert lines[2].endswith("--config.multiprocess=True --config.cpu_devices=0")
    assert r"--config.workdir=/shared/runs/gpt3\ xl" in lines[2]  # arguments stay quoted
    header = open(os.path.join(REPO, "launch/slurm.sbatch")).read()
    assert "#SBATCH --requeue" in header and "#SBATCH --signal=B:TERM@120" in header


def test_tpu_dry_run_runs_on_all_workers():
    (line,) = _dry_run("launch/tpu_pod.sh", TPU_NAME="v5p-128", ZONE="us-east5-a")
    assert line.startswith("gcloud compute tpus tpu-vm ssh v5p-128 --zone=us-east5-a --worker=all --command=")
    assert r"python\ -m\ train\ --config\ configs/gpt3_xl.py" in line
    assert r"--config.multiprocess=True\ --config.cpu_devices=0" in line


def test_tpu_script_requires_its_variables():
    proc = subprocess.run(["bash", os.path.join(REPO, "launch/tpu_pod.sh")], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")})
    assert proc.returncode != 0 and "TPU_NAME" in proc.stderr


# the comparisons' grids, fixed here so that the preset's research grids can change: 3 rates each, VeLO's 5
GRIDS = ["--config.compare.lrs.adamw=3e-3,1e-2,3e-2", "--config.compare.lrs.muon=1e-2,3e-2,1e-1",
         "--config.compare.lrs.celo2=3e-4,1e-3,3e-3", "--config.compare.lrs.celo2_base=3e-4,1e-3,3e-3",
         "--config.compare.lrs.velo=0.3,1,3,10,30"]


def test_slurm_compare_submits_each_planned_run_once(tmp_path):
    """Dry run: one sbatch per sweep run. Then, with a stand-in ``sbatch`` on PATH (SLURM is not installed
    here) that records its arguments: the first invocation submits the sweeps, a second one nothing new, and
    once an optimizer's sweep is done its seed runs, and only those."""
    import json

    workdir = tmp_path / "cmp dir"  # a space, to check the quoting
    args = ["--config", os.path.join(REPO, "configs", "compare_cpu.py"), *GRIDS, f"--config.workdir={workdir}"]
    script = os.path.join(REPO, "launch/slurm_compare.sh")
    run = lambda **env: subprocess.run(["bash", script, *args], env={**os.environ, **env}, capture_output=True,
                                       text=True, check=True).stdout.replace(" \n", "\n").strip().splitlines()
    lines = run(DRY_RUN="1", SBATCH_ARGS="--nodes=8")
    assert len(lines) == 17  # 3 + 3 + 3 + 3 + 5 learning rates, seed 0
    assert lines[0].startswith(r"sbatch --job-name=adamw_lr0.003_s0 --export=ALL\,TRAIN_MODULE=tools.compare "
                               r"--nodes=8 launch/slurm.sbatch --config ")
    assert lines[0].endswith(r"--config.workdir=" + str(workdir).replace(" ", r"\ ") + " run adamw_lr0.003_s0")
    assert not (workdir / "submitted.txt").read_text()  # a dry run records nothing

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    (bin_dir / "sbatch").write_text(f'#!/usr/bin/env bash\necho "$@" >> "{log}"\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run(**env)
    assert len(log.read_text().splitlines()) == 17
    assert run(**env)[-1].startswith("nothing to submit")
    for lr in ("0.003", "0.01", "0.03"):  # adamw's sweep finishes; 0.01 is best
        d = workdir / "runs" / f"adamw_lr{lr}_s0"
        d.mkdir(parents=True)
        loss = 5.0 if lr == "0.01" else 5.5
        (d / "done.json").write_text(json.dumps({"optimizer": "adamw", "lr": float(lr), "seed": 0,
                                                 "final_eval_loss": loss, "tokens": 1, "wall_seconds": 1}))
    run(**env)
    new = log.read_text().splitlines()[17:]
    assert [line.split()[0] for line in new] == ["--job-name=adamw_lr0.01_s1", "--job-name=adamw_lr0.01_s2"]


def _remote_run(gcloud_line: str) -> tuple[str, str]:
    """(TPU name, comparison run) of a printed ``gcloud compute tpus tpu-vm ssh`` command."""
    import shlex

    words = shlex.split(gcloud_line)
    remote = shlex.split(next(w for w in words if w.startswith("--command="))[len("--command="):])
    assert remote[3:6] == ["python", "-m", "tools.compare"], remote
    return words[5], remote[remote.index("run") + 1]


def test_tpu_compare_spreads_runs_over_slices_and_follows_sweeps_with_seeds(tmp_path):
    """Dry run: every planned sweep run once, on one of the slices, through tpu_pod.sh. Then, with a
    stand-in ``gcloud`` on PATH (no TPU here) that records each command and marks its run done the way
    ``tools.compare run`` does, the script works through the sweeps, then the seed runs of the best lr,
    and ends when nothing is left."""
    import sys

    workdir = tmp_path / "cmp dir"
    args = ["--config", os.path.join(REPO, "configs", "compare_cpu.py"), f"--config.workdir={workdir}", *GRIDS,
            "--config.compare.optimizers=adamw,muon", "--config.compare.seeds=2"]
    script = os.path.join(REPO, "launch/tpu_compare.sh")
    env = {**os.environ, "TPU_NAMES": "slice-a slice-b", "ZONE": "us-east5-a", "POLL_SECONDS": "0.2",
           "RETRY_SECONDS": "0"}
    out = subprocess.run(["bash", script, *args], env={**env, "DRY_RUN": "1"}, capture_output=True, text=True,
                         check=True).stdout.splitlines()  # (not stripped: a line may end in an escaped space)
    runs = [_remote_run(line) for line in out]
    assert len(runs) == 6 and len({name for _, name in runs}) == 6  # adamw and muon, 3 lrs each, seed 0
    assert all(name.endswith("_s0") for _, name in runs)
    assert {tpu for tpu, _ in runs} == {"slice-a", "slice-b"}  # both slices get work

    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f"""#!{sys.executable}
import json, os, shlex, sys
line = shlex.join(["gcloud", *sys.argv[1:]])
with open({str(log)!r}, "a") as f:
    f.write(line + "\\n")
remote = shlex.split(next(a for a in sys.argv if a.startswith("--command="))[len("--command="):])
name = remote[remote.index("run") + 1]
lr = float(name.split("_lr")[1].split("_s")[0])
os.makedirs(os.path.join({str(workdir)!r}, "runs", name), exist_ok=True)
with open(os.path.join({str(workdir)!r}, "runs", name, "done.json"), "w") as f:
    json.dump({{"optimizer": "x", "lr": lr, "seed": 0, "final_eval_loss": lr, "tokens": 1, "wall_seconds": 1}}, f)
""")
    (bin_dir / "gcloud").chmod(0o755)
    proc = subprocess.run(["bash", script, *args], env={**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    ran = [name for _, name in map(_remote_run, log.read_text().splitlines())]
    assert len(ran) == len(set(ran)) == 8, ran  # 6 sweep runs, then seed 1 of each optimizer's best lr
    assert {n for n in ran if n.endswith("_s1")} == {"adamw_lr0.003_s1", "muon_lr0.01_s1"}  # the lowest loss
    assert proc.stdout.count("no run left") == 2
