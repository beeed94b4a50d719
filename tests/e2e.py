"""Helpers for tests that run the real command lines on a small corpus (see conftest's fixtures)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEPS = 150
# Tiny models spend most of a short run compiling: the tests compile with less LLVM effort.
CHEAP_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def flags(corpus):
  return [f"--config={ROOT}/configs/demo.py:size=tiny,vocab_size=400,steps={STEPS},batch_size=8,seq_len=64",
          "--config.data.name=local_text", f"--config.data.paths={corpus / 'code.jsonl'}",
          f"--config.data.data_dir={corpus / 'tfds'}", "--config.data.validation_fraction=0.2",
          "--config.train.checkpoint_every=50",
          "--config.train.eval_every=75", "--config.train.eval_batches=2",
          "--config.train.log_every=10"]


def env():
  """One CPU device (the tests' fake 8-device setting would only slow a tiny run down), cheap
  compilation."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": CHEAP_COMPILE}


def run(module, *args, check=True, **kwargs):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=600, **kwargs)
  if check and proc.returncode:
    raise AssertionError(f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc
