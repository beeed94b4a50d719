"""Shared test helpers: tiny configs and synthetic packed batches."""
import glob
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import types

# Eight fake CPU devices for the sharding tests, and cheap compilation (tests compile far more
# than they run); must be set before jax is first imported.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()

import numpy as np
import pytest

from tests import e2e

ROOT = e2e.ROOT


def fake_tokenizer(vocab_size, seed=0):
  """Just what objectives read from a tokenizer: the word-start table."""
  table = np.random.default_rng(seed).random(vocab_size) < 0.4
  table[:5] = False
  return types.SimpleNamespace(vocab_size=vocab_size, word_start_table=lambda: table)


def packed_batch(rng, batch, seq_len, vocab_size):
  """Rows holding two documents and some padding, like the input pipeline's."""
  ids = rng.integers(5, vocab_size, (batch, seq_len)).astype(np.int32)
  seg = np.ones_like(ids)
  cut, end = seq_len // 2, seq_len - seq_len // 8
  seg[:, cut:] = 2
  seg[:, end:] = 0
  ids[:, 0], ids[:, cut - 1], ids[:, cut], ids[:, end - 1] = 2, 3, 2, 3
  ids[:, end:] = 0
  pos = np.where(seg == 2, np.arange(seq_len) - cut, np.arange(seq_len))
  pos = np.where(seg == 0, 0, pos).astype(np.int32)
  return {"input_ids": ids, "segment_ids": seg.astype(np.int32), "positions": pos}


@pytest.fixture
def tiny_config():
  from configs import demo  # pylint: disable=import-outside-toplevel
  return demo.get_config("size=tiny,vocab_size=500,steps=10,batch_size=8,seq_len=32")


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def runs(corpus):
  e2e.run("pretrain.data.prepare", *e2e.flags(corpus)[:6])
  straight, killed = corpus / "straight", corpus / "killed"
  e2e.run("pretrain.main", *e2e.flags(corpus), f"--workdir={straight}")

  # Kill the second run with SIGKILL as soon as its first checkpoint is complete.
  proc = subprocess.Popen([sys.executable, "-m", "pretrain.main", *e2e.flags(corpus), f"--workdir={killed}"],
                          cwd=ROOT, env=e2e.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (killed / "checkpoints" / "50").exists():
    assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
    time.sleep(0.02)
  still_running = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert still_running, "the run finished before it could be killed: the test proved nothing"
  done = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert done and done[-1] < e2e.STEPS, f"killed run already had its final checkpoint: {done}"
  e2e.run("pretrain.main", *e2e.flags(corpus), f"--workdir={killed}")
  return straight, killed
