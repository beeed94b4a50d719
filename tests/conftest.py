"""Shared test helpers: tiny configs and synthetic packed batches."""
import glob
import json
import os
import sysconfig
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


def make_tiny_config():
  from configs import demo  # pylint: disable=import-outside-toplevel
  return demo.get_config("size=tiny,vocab_size=500,steps=10,batch_size=8,seq_len=32")


def objective_resources(config, tokenizer):
  """What `registry.build` needs for `config.objective.name` without a directory: `distill` gets
  a teacher of the student's own shape with random weights and an MLM head (sets
  objective.teacher, so call it before validating)."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  from objectives import base, mlm, registry  # pylint: disable=import-outside-toplevel
  if config.objective.name != "distill":
    return base.Resources()
  config.objective.teacher = "random-mlm"
  model_config = dataclasses.replace(
      registry.encoder_config(config.model, tokenizer.vocab_size), dropout_rate=0.0)
  teacher = mlm.MaskedLM(config.objective, model_config, tokenizer)
  batch = packed_batch(np.random.default_rng(0), 1, 8, tokenizer.vocab_size)
  shapes = jax.eval_shape(teacher.init, jax.random.key(0), batch)  # no compilation
  draw = np.random.default_rng(7)
  params = jax.tree.map(lambda x: (draw.normal(size=x.shape) * 0.02).astype(x.dtype),
                        nn.unbox(shapes))
  return base.Resources(teacher=base.Teacher(model_config, params, "random-mlm", ""))


# The files that read `kill_runs` (about 90 s of training): `make test` sends them to one worker so
# that the session fixture is built once, not once per worker.
KILL_RUNS_FILES = {"test_bad_inputs.py", "test_benchmark.py", "test_distill.py", "test_e2e.py",
                   "test_launch.py", "test_reliability.py"}


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook; without xdist it is never called
def pytest_xdist_make_scheduler(config, log):
  """`--dist loadfile` (each file whole on one worker, as files share their module fixtures) with
  KILL_RUNS_FILES as one unit. (xdist's loadgroup marks do not reach the scheduler under
  pytest 9.)"""
  if config.getvalue("dist") != "loadfile":
    return None
  from xdist.scheduler import LoadFileScheduling  # pylint: disable=import-outside-toplevel

  class KillRunsTogether(LoadFileScheduling):
    def _split_scope(self, nodeid):
      scope = super()._split_scope(nodeid)
      return "kill_runs" if os.path.basename(scope) in KILL_RUNS_FILES else scope

  return KillRunsTogether(config, log)


@pytest.fixture
def tiny_config():
  return make_tiny_config()


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
def kill_runs(corpus, tmp_path_factory):
  """(straight workdir, killed workdir, kill record): the same command line run straight, and run
  with two random SIGKILLs and reruns until done (bench/soak_kills.py's code).

  Seed 3 draws targets 14 and 90: the first kill usually lands before the first checkpoint (step
  50), so the rerun starts afresh and must log step 0's evaluation once, not twice; the second
  lands after it, so the last rerun resumes mid-way. All runs share one compilation cache.
  """
  from bench import soak_kills  # pylint: disable=import-outside-toplevel
  e2e.run("pretrain.data.prepare", *e2e.flags(corpus)[:6])
  straight, killed = corpus / "straight", corpus / "killed"
  # e2e.env()'s compiler flags: test_launch compares its own run with the straight one bit for bit.
  run_env = {**soak_kills.env(str(tmp_path_factory.mktemp("xla_cache"))),
             "XLA_FLAGS": e2e.CHEAP_COMPILE}
  soak_kills.run(e2e.flags(corpus), str(straight), run_env)
  record = soak_kills.run_with_kills(
      e2e.flags(corpus), str(killed), e2e.STEPS, kills=2, rng=np.random.default_rng(3),
      run_env=run_env, log_every=10, max_delay_s=0.3, targets_within=(5, 110))
  return straight, killed, record


@pytest.fixture(scope="session")
def runs(kill_runs):
  """(straight workdir, killed-and-resumed workdir) of `kill_runs`."""
  return kill_runs[:2]
