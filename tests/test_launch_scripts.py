"""The SLURM and TPU-pod launch scripts: shellcheck-clean, and their dry runs print the right command."""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/slurm.sbatch", "launch/tpu_pod.sh"]
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
