"""Launch tooling: sweep expansion, the scripts' dry runs and refusals, and SIGTERM preemption."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT
from tests import e2e
from tests.e2e import STEPS
from pretrain.interop import load


def _sh(script, *args):
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


# --- Sweeps ----------------------------------------------------------------------------------

def test_sweep_expands_into_distinct_validated_commands(tmp_path):
  from launch import sweep  # pylint: disable=import-outside-toplevel
  overrides = sweep.load_sweep(os.path.join(ROOT, "configs/sweeps/mlm_lr.py"))
  runs = sweep.expand(overrides, "configs/demo.py:size=tiny", "root", ["--config.train.steps=5"])
  names = [name for name, _, _ in runs]
  assert len(set(names)) == len(names) == len(overrides) > 1
  for (name, workdir, command), o in zip(runs, overrides):
    assert workdir == os.path.join("root", name)
    assert command[:5] == ["python", "-m", "pretrain.main", "--config=configs/demo.py:size=tiny",
                           f"--workdir={workdir}"]
    assert f"--config.optimizer.learning_rate={o['optimizer.learning_rate']}" in command
    assert command[-1] == "--config.train.steps=5"
  electra = sweep.load_sweep(os.path.join(ROOT, "configs/sweeps/electra_lr.py"))
  assert len(sweep.expand(electra, "configs/electra.py:size=tiny", "root")) == len(electra)
  # Same last key part under two sections: names fall back to the full dotted keys.
  runs = sweep.expand([{"data.seed": 1}, {"seed": 1}], "configs/demo.py", "r")
  assert [n for n, _, _ in runs] == ["data.seed-1", "seed-1"]


def test_sweep_rejects_unknown_key_before_running(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_sweep():\n  return [{'optimizer.learning_rate': 1e-3}, "
                 "{'optimizer.learnig_rate': 1e-4}]\n")
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", f"--sweep={bad}", "--run",
                         "--config=configs/demo.py:size=tiny", f"--workdir_root={tmp_path / 'w'}"],
                        cwd=ROOT, env=e2e.env(), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert "optimizer.learnig_rate" in proc.stderr and "learnig_rate" in proc.stderr
  assert not (tmp_path / "w").exists(), "a run started before the sweep was validated"
  from launch import sweep  # pylint: disable=import-outside-toplevel
  with pytest.raises(TypeError, match="optimizer.warmup_steps"):
    sweep.expand([{"optimizer.warmup_steps": "many"}], "configs/demo.py", "r")


def test_sweep_summary_reads_final_metrics(tmp_path):
  from launch import sweep  # pylint: disable=import-outside-toplevel
  runs = sweep.expand([{"optimizer.learning_rate": 1e-3}, {"optimizer.learning_rate": 2e-3}],
                      "configs/demo.py", str(tmp_path))
  rows = [{"step": 0, "eval_mlm_accuracy": 0.01}, {"step": 10, "mlm_loss": 5.0},
          {"step": 20, "mlm_loss": 4.25}, {"step": 20, "eval_mlm_accuracy": 0.125}]
  os.makedirs(runs[0][1])
  with open(os.path.join(runs[0][1], "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  table = sweep.summary(runs).splitlines()
  assert table[0].split() == ["run", "step", "train_loss", "eval_mlm_accuracy"]
  assert table[1].split() == [runs[0][0], "20", "4.25", "0.125"]
  assert runs[1][0] in table[2] and "no metrics.jsonl" in table[2]


# --- Scripts: dry runs and refusals ---------------------------------------------------------

def test_local_dry_run_starts_one_process_per_id():
  proc = _sh("local.sh", "--config=configs/demo.py:size=tiny", "--workdir=w", "--num_processes=3",
             "--port=4321", "--config.train.steps=5", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line.split() == ["python", "-m", "pretrain.main", "--config=configs/demo.py:size=tiny",
                            "--workdir=w", "--coordinator_address=127.0.0.1:4321",
                            "--num_processes=3", f"--process_id={i}", "--config.train.steps=5"]
  single = _sh("local.sh", "--config=c.py", "--workdir=w", "--dry_run").stdout.split()
  assert single == ["python", "-m", "pretrain.main", "--config=c.py", "--workdir=w"]


def test_tpu_vm_dry_run_prints_every_gcloud_step():
  proc = _sh("tpu_vm.sh", "all", "--name=pod", "--zone=us-central2-b", "--accelerator_type=v4-16",
             "--config=configs/bert.py", "--workdir=gs://bucket/run", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert ("gcloud compute tpus tpu-vm create pod --zone=us-central2-b --accelerator-type=v4-16 "
          "--version=tpu-ubuntu2204-base") in out
  assert out.count("gcloud compute tpus tpu-vm ssh pod --zone=us-central2-b --worker=all") == 3
  assert "pip install -q -e . \"jax[tpu]\"" in out
  assert ("python -m pretrain.main --multihost --config=configs/bert.py --workdir=gs://bucket/run"
          in out)
  assert out.strip().splitlines()[-1] == "gcloud compute tpus tpu-vm delete pod --zone=us-central2-b --quiet"


def test_slurm_dry_run_prints_sbatch_script_and_srun():
  proc = _sh("gpu_slurm.sh", "--nodes=2", "--config=configs/bert.py", "--workdir=/shared/run",
             "--dry_run")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=1" in out
  assert "#SBATCH --signal=TERM@" in out
  assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in out
  assert "srun --nodes=2 --ntasks-per-node=1" in out
  assert ("python -m pretrain.main --multihost --config=configs/bert.py --workdir=/shared/run "
          "--coordinator_address=$COORDINATOR --num_processes=$SLURM_NTASKS "
          "--process_id=$SLURM_PROCID") in out
  auto = _sh("gpu_slurm.sh", "--srun", "--nodes=2", "--config=c", "--workdir=w", "--dry_run",
             "--slurm_autodetect").stdout
  assert "srun --nodes=2" in auto and "--multihost" in auto and "--process_id" not in auto


@pytest.mark.parametrize("script,args,flag", [
    ("local.sh", ["--workdir=w"], "--config"),
    ("local.sh", ["--config=c"], "--workdir"),
    ("tpu_vm.sh", ["create", "--name=n", "--zone=z"], "--accelerator_type"),
    ("tpu_vm.sh", ["run", "--zone=z", "--config=c", "--workdir=gs://b/w"], "--name"),
    ("tpu_vm.sh", ["run", "--name=n", "--zone=z", "--workdir=gs://b/w"], "--config"),
    ("tpu_vm.sh", ["run", "--name=n", "--zone=z", "--config=c", "--workdir=local/w"], "--workdir"),
    ("gpu_slurm.sh", ["--config=c", "--workdir=w"], "--nodes"),
    ("gpu_slurm.sh", ["--nodes=2", "--workdir=w"], "--config"),
])
def test_scripts_refuse_missing_values(script, args, flag):
  proc = _sh(script, *args, "--dry_run")
  assert proc.returncode == 2 and flag in proc.stderr, (proc.returncode, proc.stderr)
  assert not proc.stdout, "printed commands despite a missing value"


# --- SIGTERM: save at the step reached, exit 0, resume equal to an uninterrupted run ----------

def test_sigterm_saves_exits_zero_and_resume_equals_straight_run(corpus, runs, tmp_path):
  from pretrain.training import metrics  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  straight, termed = runs[0], tmp_path / "termed"  # The uninterrupted run is shared with test_e2e.
  proc = subprocess.Popen([sys.executable, "-m", "pretrain.main", *e2e.flags(corpus), f"--workdir={termed}"],
                          cwd=ROOT, env=e2e.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while not (termed / "checkpoints" / "50").exists():
    assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
    time.sleep(0.02)
  assert proc.poll() is None, "the run finished before SIGTERM: the test proved nothing"
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-5000:]
  saved = sorted(int(p.name) for p in (termed / "checkpoints").iterdir() if p.name.isdigit())
  stopped = max(saved)
  assert f"Preempted: saved step {stopped} and stopping" in err
  assert 50 < stopped < STEPS and stopped % 50, f"checkpoints {saved}: not saved at the step reached"
  assert max(r["step"] for r in metrics.read_jsonl(str(termed))) <= stopped

  e2e.run("pretrain.main", *e2e.flags(corpus), f"--workdir={termed}")
  _, _, _, params_a, step_a = load.load_workdir(str(straight))
  _, _, _, params_b, step_b = load.load_workdir(str(termed))
  assert step_a == step_b == STEPS
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  losses = lambda w: [(r["step"], r["mlm_loss"]) for r in metrics.read_jsonl(str(w)) if "mlm_loss" in r]  # noqa: E731
  assert losses(straight) == losses(termed) and len(losses(straight)) == STEPS // 10
