#!/usr/bin/env bash
# Submit an optimizer comparison to SLURM: one multi-node job per planned run, each through
# launch/slurm.sbatch (requeued on preemption, resumed from its checkpoint).
#
#   bash launch/slurm_compare.sh --config configs/compare_gpt3_xl.py [--config.*=...]
#   DRY_RUN=1 bash launch/slurm_compare.sh --config configs/compare_gpt3_xl.py   # print, submit nothing
#   python -m tools.compare --config configs/compare_gpt3_xl.py report           # table and verdicts so far
#
# The first invocation submits the learning-rate sweeps; each seed run is planned once its optimizer's
# sweep has finished, so invoke it again then (e.g. from cron, or after the sweep jobs end): it submits
# only runs that are newly planned and neither done nor submitted before (<workdir>/submitted.txt).
# SBATCH_ARGS adds sbatch options (e.g. SBATCH_ARGS="--nodes=8 --partition=gpu").
set -euo pipefail
cd "$(dirname "$0")/.."

plan_json=$(python -m tools.compare "$@" plan | sed -n 's/^plan written to //p')
submitted="$(dirname "${plan_json}")/submitted.txt"
touch "${submitted}"

# one line per run to submit: name, then the run's arguments for `python -m tools.compare`
runs=$(python -m launch.compare_runs "${plan_json}" --exclude "${submitted}")
if [[ -z "${runs}" ]]; then
  echo "nothing to submit: every planned run is done or submitted (see ${submitted})"
  exit 0
fi

read -r -a extra <<< "${SBATCH_ARGS:-}"
while read -r name args; do
  eval "run_args=(${args})"
  cmd=(sbatch --job-name="${name}" "--export=ALL,TRAIN_MODULE=tools.compare" "${extra[@]}" launch/slurm.sbatch
       "${run_args[@]}")
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${cmd[@]}"
    echo
  else
    "${cmd[@]}"
    echo "${name}" >> "${submitted}"
  fi
done <<< "${runs}"
