#!/usr/bin/env bash
# Run an optimizer comparison on Cloud TPU slices: each slice works through its share of the planned runs,
# one after another, each on every host of the slice through launch/tpu_pod.sh, and plans again after each
# run, so that an optimizer's seed runs follow once its sweep has finished. Runs are split over the slices
# by a stable hash of their name (launch/compare_runs.py). A slice with nothing of its own left waits
# (POLL_SECONDS, default 300) while runs of other slices are pending; the script ends when no run is pending
# or started. A run whose command fails (a preempted slice) is tried again after RETRY_SECONDS (default 60),
# resuming from its checkpoint, at most MAX_ATTEMPTS times (default 5); a slice that gives up stops the
# script (rerun it to go on: finished runs are kept, started ones resume).
#
#   TPU_NAMES="v5p-128-a v5p-128-b" ZONE=us-east5-a bash launch/tpu_compare.sh \
#       --config configs/compare_gpt3_xl.py --config.workdir=gs://my-bucket/compare_gpt3_xl
#   DRY_RUN=1 TPU_NAMES=... ZONE=... bash launch/tpu_compare.sh ...   # print each slice's runs planned now
#   python -m tools.compare --config configs/compare_gpt3_xl.py --config.workdir=... report
#
# The workdir must be storage that every host and this machine share (a GCS bucket), and the repository
# must be installed on every host (see launch/tpu_pod.sh). Run this where it may keep running (tmux, a VM).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${TPU_NAMES:?set TPU_NAMES to the TPU VM names, space-separated}"
: "${ZONE:?set ZONE to the TPUs zone}"
read -r -a slices <<< "${TPU_NAMES}"
n=${#slices[@]}

plan() {
  python -m tools.compare "$@" plan | sed -n 's/^plan written to //p'
}

run_on_slice() {  # slice index, then the run's tools.compare arguments (shell-quoted)
  local i=$1 args=$2
  local -a run_args
  eval "run_args=(${args})"
  TPU_NAME="${slices[$i]}" TRAIN_MODULE=tools.compare bash launch/tpu_pod.sh "${run_args[@]}"
}

if [[ -n "${DRY_RUN:-}" ]]; then
  plan_json=$(plan "$@")
  for i in "${!slices[@]}"; do
    while read -r _ args; do
      run_on_slice "${i}" "${args}"
    done < <(python -m launch.compare_runs "${plan_json}" --slice "${i}/${n}")
  done
  exit 0
fi

work_slice() {  # slice index, then the comparison's arguments
  local i=$1
  shift
  local -A attempts=()
  while true; do
    local plan_json mine name args
    plan_json=$(plan "$@")
    mine=$(python -m launch.compare_runs "${plan_json}" --slice "${i}/${n}" --first)
    if [[ -z "${mine}" ]]; then
      if [[ -z "$(python -m launch.compare_runs "${plan_json}")" ]]; then
        echo "[${slices[$i]}] no run left"
        return 0
      fi
      sleep "${POLL_SECONDS:-300}"
      continue
    fi
    read -r name args <<< "${mine}"
    attempts[${name}]=$(( ${attempts[${name}]:-0} + 1 ))
    if (( attempts[${name}] > ${MAX_ATTEMPTS:-5} )); then
      echo "[${slices[$i]}] ${name} failed ${MAX_ATTEMPTS:-5} times; stopping this slice" >&2
      return 1
    fi
    echo "[${slices[$i]}] ${name} (attempt ${attempts[${name}]})"
    run_on_slice "${i}" "${args}" || sleep "${RETRY_SECONDS:-60}"
  done
}

pids=()
for i in "${!slices[@]}"; do
  work_slice "${i}" "$@" &
  pids+=($!)
done
for _ in "${pids[@]}"; do
  if ! wait -n; then  # a slice gave up: its runs would be waited for forever; rerun the script to go on
    kill "${pids[@]}" 2>/dev/null || true
    exit 1
  fi
done
