"""SIGKILL soak: kill training at random steps, rerun until it finishes, compare with a straight run.

  python bench/soak_kills.py [--kills=5] [--steps=40] [--seed=0] [--root=DIR]

Both runs are the real command line (`python -m pretrain.main`, one CPU device) on a tiny config
over a JSONL corpus of standard-library files. The killed run gets SIGKILL (no handler, no cleanup:
a crash, an OOM kill, a lost machine) at `--kills` random points: after a random logged step, plus
a random delay, so kills land mid-step, mid-save and between saves. Each rerun resumes from the
newest complete checkpoint. The claim checked: the final parameters (read back from the checkpoint)
are bitwise equal to the straight run's, and so is every logged metric row, losses and evaluations
included (only tokens/s differs). Reruns share a persistent XLA compilation cache: compiled once,
the same executable every time. tests/test_reliability.py runs the same code with two kills.
"""
import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np
from pretrain.interop import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TIMING_KEYS = ("tokens_per_s", "mfu", "goodput")  # Wall-clock measures: differ run to run.


def write_corpus(root):
  """A JSONL file of standard-library sources, one document per line."""
  stdlib = sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(stdlib, "json", "*.py")) +
                 glob.glob(os.path.join(stdlib, "email", "*.py")))[:40]
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "code.jsonl")
  with open(path, "w") as f:
    for name in files:
      with open(name, encoding="utf-8") as src:
        f.write(json.dumps({"text": src.read()}) + "\n")
  return path


def tiny_flags(corpus_dir, steps):
  """Tiny model, sequence 32, batch 4, a checkpoint every 5 steps, a log row every step."""
  return [f"--config={ROOT}/configs/demo.py:size=tiny,vocab_size=400,steps={steps},batch_size=4,"
          f"seq_len=32",
          "--config.data.name=local_text", f"--config.data.paths={corpus_dir}/code.jsonl",
          f"--config.data.data_dir={corpus_dir}/tfds", "--config.data.validation_fraction=0.2",
          "--config.train.checkpoint_every=5", f"--config.train.eval_every={max(1, steps // 2)}",
          "--config.train.eval_batches=2", "--config.train.log_every=1"]


def env(cache_dir=None):
  """One CPU device (no fake devices), and a shared compilation cache when given."""
  result = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  if cache_dir:
    result.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return result


def _main_command(flags, workdir):
  return [sys.executable, "-m", "pretrain.main", *flags, f"--workdir={workdir}"]


def run(flags, workdir, run_env):
  """One uninterrupted run; raises with its output if it fails."""
  proc = subprocess.run(_main_command(flags, workdir), cwd=ROOT, env=run_env, capture_output=True,
                        text=True, timeout=1800)
  if proc.returncode:
    raise RuntimeError(f"pretrain.main failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def _logged_steps(workdir):
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [json.loads(line)["step"] for line in f if line.endswith("\n")]
  except FileNotFoundError:
    return []


def _checkpoints(workdir):
  try:
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
  except FileNotFoundError:
    return []


def run_with_kills(flags, workdir, steps, kills, rng, run_env, log_every=1, max_delay_s=0.5,
                   targets_within=None, timeout_s=1800):
  """Runs to completion, SIGKILLing the run `kills` times at random steps; returns the kill log.

  Each kill waits for a logged step past a random target in `targets_within` (default: any step
  before the last), sleeps a random fraction of `max_delay_s`, and kills. Targets increase, each
  beyond every step already logged, so a stale row of an earlier attempt never triggers a kill.
  """
  low, high = targets_within or (1, steps - 1)
  targets = sorted(rng.choice(np.arange(low, high + 1), size=kills, replace=False).tolist())
  record = []
  deadline = time.time() + timeout_s
  for target in targets:
    target = max(target, max(_logged_steps(workdir), default=0) + log_every)
    if target >= steps:
      break  # The run is too far along for another kill before its end.
    proc = subprocess.Popen(_main_command(flags, workdir), cwd=ROOT, env=run_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while max(_logged_steps(workdir), default=-1) < target:
      if proc.poll() is not None:
        raise RuntimeError(f"run ended (rc {proc.returncode}) before step {target}:\n"
                           f"{proc.stderr.read()[-5000:]}")
      if time.time() > deadline:
        proc.kill()
        raise TimeoutError(f"no step {target} within {timeout_s}s")
      time.sleep(0.01)
    time.sleep(rng.uniform(0, max_delay_s))
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    record.append(dict(target=target, last_logged=max(_logged_steps(workdir)),
                       checkpoints=_checkpoints(workdir), killed_while_running=alive))
  run(flags, workdir, run_env)
  return record


def compare(straight, killed):
  """Bitwise comparison of final parameters and of every logged row (timings aside)."""
  import jax  # pylint: disable=import-outside-toplevel
  from pretrain.training import metrics  # pylint: disable=import-outside-toplevel
  _, _, _, params_a, step_a = load.load_workdir(straight)
  _, _, _, params_b, step_b = load.load_workdir(killed)
  leaves_a, leaves_b = jax.tree.leaves(params_a), jax.tree.leaves(params_b)
  different = sum(not np.array_equal(a, b) for a, b in zip(leaves_a, leaves_b))
  strip = lambda w: [{k: v for k, v in r.items() if k not in TIMING_KEYS}  # noqa: E731
                     for r in metrics.read_jsonl(w)]
  rows_a, rows_b = strip(straight), strip(killed)
  first_diff = next((i for i, (a, b) in enumerate(zip(rows_a, rows_b)) if a != b), None)
  return dict(steps=(step_a, step_b), param_leaves=len(leaves_a), different_leaves=different,
              rows=(len(rows_a), len(rows_b)), first_different_row=first_diff,
              losses=[(r["step"], r["mlm_loss"]) for r in rows_a if "mlm_loss" in r],
              equal=(step_a == step_b and len(leaves_a) == len(leaves_b) and different == 0
                     and rows_a == rows_b))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=5)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--root", default="", help="Where corpus and workdirs go (default: a temp dir).")
  args = parser.parse_args()
  root = args.root or tempfile.mkdtemp(prefix="soak_kills_")
  corpus_dir = os.path.join(root, "corpus")
  write_corpus(corpus_dir)
  flags = tiny_flags(corpus_dir, args.steps)
  run_env = env(os.path.join(root, "xla_cache"))
  subprocess.run([sys.executable, "-m", "pretrain.data.prepare", *flags[:6]], cwd=ROOT, env=run_env,
                 check=True, capture_output=True)
  t0 = time.time()
  run(flags, os.path.join(root, "straight"), run_env)
  t1 = time.time()
  record = run_with_kills(flags, os.path.join(root, "killed"), args.steps, args.kills,
                          np.random.default_rng(args.seed), run_env)
  t2 = time.time()
  result = compare(os.path.join(root, "straight"), os.path.join(root, "killed"))
  print(f"straight run: {t1 - t0:.0f}s; killed run with {len(record)} kills: {t2 - t1:.0f}s "
        f"(root {root})")
  for i, k in enumerate(record, 1):
    print(f"  kill {i}: after logged step {k['last_logged']} (target {k['target']}), checkpoints on "
          f"disk {k['checkpoints']}, process still running: {k['killed_while_running']}")
  print(f"final step {result['steps']}; parameter leaves differing: {result['different_leaves']} of "
        f"{result['param_leaves']}; metric rows {result['rows']}, first differing row: "
        f"{result['first_different_row']}")
  print("EQUAL to the uninterrupted run" if result["equal"] else "DIFFERENT from the uninterrupted run")
  return 0 if result["equal"] and len(record) == args.kills else 1


if __name__ == "__main__":
  sys.exit(main())
