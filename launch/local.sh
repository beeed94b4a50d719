#!/usr/bin/env bash
# Runs pretraining on this machine: one process, or N processes joined by jax.distributed on
# 127.0.0.1 (how a multi-host run is tested before it costs a pod).
#
#   launch/local.sh --config=configs/demo.py:size=tiny --workdir=workdirs/tiny [--config.a.b=v ...]
#   launch/local.sh --num_processes=2 --port=12355 --config=... --workdir=... [--dry_run]
#
# Every argument it does not know goes unchanged to `python -m pretrain.main`. Set PYTHON to use
# another interpreter. Rerunning the same command resumes from the workdir's latest checkpoint.
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
SCRIPT=launch/local.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

config="" workdir="" num_processes=1 port=12355 dry_run=0 extra=()
for arg in "$@"; do
  case "$arg" in
    --config=*) config="${arg#--config=}" ;;
    --workdir=*) workdir="${arg#--workdir=}" ;;
    --num_processes=*) num_processes="${arg#--num_processes=}" ;;
    --port=*) port="${arg#--port=}" ;;
    --dry_run) dry_run=1 ;;
    -h|--help) usage ;;
    *) extra+=("$arg") ;;  # e.g. --config.train.steps=20: pretrain.main checks it.
  esac
done
[[ -n "$config" ]] || die "missing --config (e.g. --config=configs/demo.py:size=tiny)."
[[ -n "$workdir" ]] || die "missing --workdir (e.g. --workdir=workdirs/tiny)."
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die "--num_processes must be a positive integer, got '$num_processes'."
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'."

python="${PYTHON:-python}"
# glibc's malloc on transparent huge pages, as `make demo` runs (README Performance).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
base=("$python" -m pretrain.main "--config=$config" "--workdir=$workdir")

command_for() {  # Fills cmd with the command line of process $1.
  cmd=("${base[@]}")
  if (( num_processes > 1 )); then
    cmd+=("--coordinator_address=127.0.0.1:$port" "--num_processes=$num_processes" "--process_id=$1")
  fi
  cmd+=(${extra[@]+"${extra[@]}"})
}

if (( dry_run )); then
  for ((i = 0; i < num_processes; i++)); do command_for "$i"; printf '%q ' "${cmd[@]}"; echo; done
  exit 0
fi

if (( num_processes == 1 )); then
  command_for 0
  exec "${cmd[@]}"  # exec: SIGTERM reaches pretrain.main itself, which saves and stops.
fi

pids=()
# Forward SIGTERM/SIGINT so every process reaches the same preemption step and saves.
trap 'for p in "${pids[@]}"; do [[ -n "$p" ]] && kill -TERM "$p" 2>/dev/null || true; done' TERM INT
for ((i = 0; i < num_processes; i++)); do
  command_for "$i"
  "${cmd[@]}" &
  pids+=($!)
done
status=0 running=${#pids[@]}
# Poll instead of `wait -n` (bash >= 4.3 only). When one process fails the others would wait for it
# at their next collective until a timeout, so stop them at once.
while (( running > 0 )); do
  sleep 1
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null || continue
    set +e; wait "$pid"; rc=$?; set -e
    pids[$i]="" running=$((running - 1))
    if (( rc != 0 )); then
      echo "launch/local.sh: process $i (pid $pid) failed with exit code $rc; stopping the others." >&2
      status=1
      for other in "${pids[@]}"; do [[ -n "$other" ]] && kill -TERM "$other" 2>/dev/null || true; done
    fi
  done
done
exit "$status"
