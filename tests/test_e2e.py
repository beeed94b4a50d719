"""End to end through the real command lines: prepare, train, SIGKILL, resume, export, reload.

The corpus is a JSONL file of standard-library sources (the `local_text` builder), small enough
for a tiny model to run in seconds; the same code path serves the full embedded corpus.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time

import numpy as np
import pytest

from tests.conftest import ROOT

STEPS = 150


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  stdlib = sysconfig.get_paths()["stdlib"]
  files = sorted(glob.glob(os.path.join(stdlib, "json", "*.py")) +
                 glob.glob(os.path.join(stdlib, "email", "*.py")))[:40]
  with open(root / "code.jsonl", "w") as f:
    for path in files:
      with open(path, encoding="utf-8") as src:
        f.write(json.dumps({"text": src.read()}) + "\n")
  return root


def _flags(corpus):
  return [f"--config={ROOT}/configs/demo.py:size=tiny,vocab_size=400,steps={STEPS},batch_size=8,seq_len=64",
          "--config.data.name=local_text", f"--config.data.paths={corpus / 'code.jsonl'}",
          f"--config.data.data_dir={corpus / 'tfds'}", "--config.data.validation_fraction=0.2",
          "--config.train.checkpoint_every=50",
          "--config.train.eval_every=75", "--config.train.eval_batches=2",
          "--config.train.log_every=10"]


def _env():
  """One CPU device: the tests' fake 8-device setting would only slow a tiny run down."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _run(module, *args, check=True, **kwargs):
  env = _env()
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, **kwargs)
  if check and proc.returncode:
    raise AssertionError(f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc


@pytest.fixture(scope="module")
def runs(corpus):
  _run("pretrain.data.prepare", *_flags(corpus)[:6])
  straight, killed = corpus / "straight", corpus / "killed"
  _run("pretrain.main", *_flags(corpus), f"--workdir={straight}")

  # Kill the second run with SIGKILL as soon as its first checkpoint is complete.
  proc = subprocess.Popen([sys.executable, "-m", "pretrain.main", *_flags(corpus), f"--workdir={killed}"],
                          cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (killed / "checkpoints" / "50").exists():
    assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
    time.sleep(0.02)
  still_running = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert still_running, "the run finished before it could be killed: the test proved nothing"
  done = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert done and done[-1] < STEPS, f"killed run already had its final checkpoint: {done}"
  _run("pretrain.main", *_flags(corpus), f"--workdir={killed}")
  return straight, killed


def test_resume_after_sigkill_equals_uninterrupted_run(runs):
  from pretrain import export, metrics  # pylint: disable=import-outside-toplevel
  straight, killed = runs
  _, _, _, params_a, step_a = export.load_workdir(str(straight))
  _, _, _, params_b, step_b = export.load_workdir(str(killed))
  assert step_a == step_b == STEPS
  import jax  # pylint: disable=import-outside-toplevel
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  losses = lambda w: [(r["step"], r["mlm_loss"]) for r in metrics.read_jsonl(str(w)) if "mlm_loss" in r]  # noqa: E731
  assert losses(straight) == losses(killed)
  evals = [r for r in metrics.read_jsonl(str(straight)) if "eval_mlm_accuracy" in r]
  assert evals[0]["step"] == 0 and evals[-1]["eval_mlm_accuracy"] > evals[0]["eval_mlm_accuracy"] + 0.05


def test_resume_with_another_model_shape_names_the_field(runs):
  straight, _ = runs
  proc = _run("pretrain.main", *_flags(runs[0].parent), f"--workdir={straight}",
              "--config.model.hidden_size=32", "--config.model.num_heads=2", check=False)
  assert proc.returncode != 0
  assert "model.hidden_size=64" in proc.stderr and "--config.model.hidden_size" in proc.stderr


def test_export_loads_in_transformers_with_same_logits(runs, tmp_path):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from pretrain import export  # pylint: disable=import-outside-toplevel
  from pretrain.models import encoder as enc  # pylint: disable=import-outside-toplevel
  _, killed = runs
  out = tmp_path / "export"
  _run("pretrain.export", f"--workdir={killed}", f"--out={out}")
  with pytest.raises(FileExistsError, match="not empty"):
    export.export(str(killed), str(out))
  _, tokenizer, objective, params, _ = export.load_workdir(str(killed))
  text = 'def greet(name):\n    """Say hello."""\n    return f"Hello, {name}!"\n'
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  ids = hf_tokenizer(text)["input_ids"]
  assert ids == [2] + tokenizer.encode(text) + [3]
  model = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits.numpy()[0]
  ids_BL = jnp.asarray([ids])
  hidden = objective.encoder_module.apply({"params": params["encoder"]}, ids_BL, jnp.ones_like(ids_BL),
                                          jnp.arange(len(ids))[None])
  ours = objective.head_module.apply({"params": params["mlm_head"]}, hidden,
                                     enc.word_embedding_table(params["encoder"]))[0]
  assert np.max(np.abs(np.asarray(ours) - theirs)) < 1e-4
