#!/usr/bin/env bash
# Creates a Cloud TPU VM (one host or a pod slice), installs this project on every worker, runs
# `pretrain.main --multihost` on all workers at once, and deletes the VM.
#
#   launch/tpu_vm.sh all --name=NAME --zone=ZONE --accelerator_type=v5litepod-16 \
#       --config=configs/bert.py --workdir=gs://BUCKET/runs/bert [--config.a.b=v ...] [--dry_run]
#   launch/tpu_vm.sh create|install|run|delete ...   (one step; `run` again resumes)
#
# Options: --version (TPU software, default tpu-ubuntu2204-base), --project, --spot,
#   --repo=GIT_URL [--branch=B] (default: copy `git archive HEAD` of this checkout),
#   --dir (install directory on the workers, default encoder-pretrain).
# Unknown arguments go unchanged to pretrain.main. --dry_run prints every gcloud command only.
set -euo pipefail

SCRIPT=launch/tpu_vm.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
[[ $# -gt 0 ]] || die "missing subcommand: create, install, run, delete or all (see the top of this file)."
subcommand=$1; shift
case "$subcommand" in create|install|run|delete|all) ;; -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
  *) die "unknown subcommand '$subcommand'; use create, install, run, delete or all." ;; esac

name="" zone="" accelerator_type="" version="tpu-ubuntu2204-base" project="" spot=0
config="" workdir="" repo="" branch="" dir="encoder-pretrain" dry_run=0 extra=()
for arg in "$@"; do
  case "$arg" in
    --name=*) name="${arg#*=}" ;;
    --zone=*) zone="${arg#*=}" ;;
    --accelerator_type=*) accelerator_type="${arg#*=}" ;;
    --version=*) version="${arg#*=}" ;;
    --project=*) project="${arg#*=}" ;;
    --spot) spot=1 ;;
    --config=*) config="${arg#*=}" ;;
    --workdir=*) workdir="${arg#*=}" ;;
    --repo=*) repo="${arg#*=}" ;;
    --branch=*) branch="${arg#*=}" ;;
    --dir=*) dir="${arg#*=}" ;;
    --dry_run) dry_run=1 ;;
    *) extra+=("$arg") ;;
  esac
done

need() {  # need FLAG VALUE HINT: refuses an empty value before any gcloud call.
  [[ -n "$2" ]] || die "missing --$1 (needed by '$subcommand'), e.g. --$1=$3."
}
need name "$name" my-tpu
need zone "$zone" us-central2-b
if [[ $subcommand == create || $subcommand == all ]]; then
  need accelerator_type "$accelerator_type" v4-8
fi
if [[ $subcommand == run || $subcommand == all ]]; then
  need config "$config" configs/bert.py
  need workdir "$workdir" gs://BUCKET/runs/NAME
  # Every worker writes its checkpoint shards into the same directory: only a bucket is shared.
  [[ $workdir == gs://* ]] || die "--workdir must be a gs:// bucket path shared by all workers, got '$workdir'."
fi

common=("--zone=$zone")
[[ -n "$project" ]] && common+=("--project=$project")

gc() {  # Runs (or with --dry_run prints) one gcloud command.
  if (( dry_run )); then quote gcloud "$@"; else gcloud "$@"; fi
}
on_all_workers() { gc compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$1"; }

do_create() {
  local flags=(--accelerator-type="$accelerator_type" --version="$version")
  (( spot )) && flags+=(--spot)
  gc compute tpus tpu-vm create "$name" "${common[@]}" "${flags[@]}"
}

do_install() {
  if [[ -n "$repo" ]]; then
    local clone=(git clone --depth=1)
    [[ -n "$branch" ]] && clone+=("--branch=$branch")
    on_all_workers "rm -rf $(quote "$dir") && $(quote "${clone[@]}" "$repo" "$dir")"
  else
    # A committed tree, not the working copy: the run is reproducible from its commit.
    local archive="${TMPDIR:-/tmp}/encoder-pretrain-$$.tar.gz"
    if (( dry_run )); then echo "git archive --format=tar.gz --output=$archive HEAD"
    else git archive --format=tar.gz --output="$archive" HEAD; fi
    gc compute tpus tpu-vm scp "$archive" "$name:encoder-pretrain.tar.gz" "${common[@]}" --worker=all
    on_all_workers "rm -rf $(quote "$dir") && mkdir -p $(quote "$dir") && tar -xzf encoder-pretrain.tar.gz -C $(quote "$dir")"
    (( dry_run )) || rm -f "$archive"
  fi
  on_all_workers "cd $(quote "$dir") && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . \"jax[tpu]\""
}

do_run() {
  # jax.distributed.initialize() reads the pod's topology from the TPU metadata; no addresses needed.
  on_all_workers "cd $(quote "$dir") && .venv/bin/python -m pretrain.main --multihost $(quote "--config=$config" "--workdir=$workdir" ${extra[@]+"${extra[@]}"})"
}

do_delete() { gc compute tpus tpu-vm delete "$name" "${common[@]}" --quiet; }

case "$subcommand" in
  create) do_create ;;
  install) do_install ;;
  run) do_run ;;
  delete) do_delete ;;
  all)
    do_create
    # Delete the VM whatever happens after it exists: an idle pod slice keeps costing money.
    trap do_delete EXIT
    do_install
    do_run ;;
esac
