#!/usr/bin/env bash
# Multi-node GPU pretraining under SLURM: one process per node, each seeing all of its node's GPUs,
# joined by jax.distributed (process 0's node is the coordinator).
#
#   launch/gpu_slurm.sh --nodes=4 --config=configs/bert.py --workdir=/shared/runs/bert \
#       [--gpus_per_node=8] [--partition=P] [--account=A] [--time=24:00:00] [--config.a.b=v ...]
#     writes slurm/<job_name>.sbatch and submits it with sbatch; --dry_run prints the script only.
#   launch/gpu_slurm.sh --srun --nodes=4 --config=... --workdir=...
#     runs the same srun line now, inside an allocation you already hold (salloc).
#
# --slurm_autodetect leaves coordinator/process flags out and lets jax.distributed.initialize()
# read SLURM's variables itself. Other options: --job_name, --port, --python (default: python
# on the PATH that sbatch exports). Unknown arguments go unchanged to pretrain.main.
set -euo pipefail

SCRIPT=launch/gpu_slurm.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
nodes="" gpus_per_node=8 partition="" account="" time_limit="" job_name="pretrain" port=29500
python="python" config="" workdir="" mode=sbatch dry_run=0 autodetect=0 extra=()
for arg in "$@"; do
  case "$arg" in
    --nodes=*) nodes="${arg#*=}" ;;
    --gpus_per_node=*) gpus_per_node="${arg#*=}" ;;
    --partition=*) partition="${arg#*=}" ;;
    --account=*) account="${arg#*=}" ;;
    --time=*) time_limit="${arg#*=}" ;;
    --job_name=*) job_name="${arg#*=}" ;;
    --port=*) port="${arg#*=}" ;;
    --python=*) python="${arg#*=}" ;;
    --config=*) config="${arg#*=}" ;;
    --workdir=*) workdir="${arg#*=}" ;;
    --srun) mode=srun ;;
    --dry_run) dry_run=1 ;;
    --slurm_autodetect) autodetect=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) extra+=("$arg") ;;
  esac
done
[[ -n "$config" ]] || die "missing --config (e.g. --config=configs/bert.py)."
[[ -n "$workdir" ]] || die "missing --workdir: a directory every node can read and write (shared filesystem or gs://)."
[[ -n "$nodes" ]] || die "missing --nodes (e.g. --nodes=2)."
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'."
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node must be a positive integer, got '$gpus_per_node'."

# The per-task part is single-quoted: SLURM_PROCID differs per task and is read by each task's shell.
train=$(quote "$python" -m pretrain.main --multihost "--config=$config" "--workdir=$workdir" ${extra[@]+"${extra[@]}"})
if (( ! autodetect )); then
  train+=' --coordinator_address=$COORDINATOR --num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID'
fi
# --kill-on-bad-exit: one failed node ends the step instead of leaving the others blocked.
srun_line="srun --nodes=$nodes --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c $(quote "exec $train")"
coordinator_line="export COORDINATOR=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n 1):$port\""

if [[ $mode == srun ]]; then
  [[ -n "${SLURM_JOB_NODELIST:-}" ]] || (( dry_run )) || die "--srun needs a SLURM allocation (salloc --nodes=$nodes ...); without one, leave --srun out to submit a batch job."
  if (( dry_run )); then printf '%s\n%s\n' "$coordinator_line" "$srun_line"; exit 0; fi
  eval "$coordinator_line"
  eval "$srun_line"
  exit
fi

script="#!/bin/bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus_per_node
#SBATCH --output=slurm/%x-%j.out
${partition:+#SBATCH --partition=$partition
}${account:+#SBATCH --account=$account
}${time_limit:+#SBATCH --time=$time_limit
}# SIGTERM 5 minutes before the time limit (or on preemption): pretrain.main saves and exits 0;
# the requeued or resubmitted job resumes from that checkpoint.
#SBATCH --signal=TERM@300
#SBATCH --requeue
set -euo pipefail
$coordinator_line
$srun_line"

if (( dry_run )); then echo "$script"; exit 0; fi
mkdir -p slurm
path="slurm/$job_name.sbatch"
echo "$script" > "$path"
echo "Wrote $path" >&2
sbatch "$path"
