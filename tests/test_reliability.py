"""Fault injection: kills, unreadable checkpoints, a full disk, NaN steps, bad inputs, pickles.

Each test breaks one thing the way it breaks in practice and checks the promise that covers it:
resume equals an uninterrupted run, the last good checkpoint survives, a non-finite step never
trains on silently, an error names the problem and the fix, and no file is ever unpickled.
"""
import ast
import json
import logging
import os
import pickle
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import soak_kills
from configs import common, demo
from pretrain.training import checkpointing, metrics, nonfinite, optimizer as optimizer_lib, sharding
from pretrain.interop import hf_bert, hf_read
from pretrain import train
from pretrain.data import python_code, tokenizer as tokenizer_lib
from tests import e2e
from tests.conftest import ROOT, fake_tokenizer, packed_batch
from objectives import registry
from pretrain.training import run as run_lib
from pretrain.training import state as state_lib
from pretrain.training import step as step_lib

VOCAB = 500


# --------------------------------------------------------------------------------- kills ---

def test_two_random_sigkills_resume_to_the_uninterrupted_run(kill_runs):
  """bench/soak_kills.py with two kills (the bench runs five): conftest's `kill_runs`."""
  straight, killed, record = kill_runs
  assert len(record) == 2 and all(k["killed_while_running"] for k in record), record
  assert record[-1]["checkpoints"], "the last kill should come after a checkpoint (a real resume)"
  result = soak_kills.compare(str(straight), str(killed))
  assert result["equal"], {k: v for k, v in result.items() if k != "losses"}
  assert result["steps"] == (e2e.STEPS, e2e.STEPS) and len(result["losses"]) == e2e.STEPS // 10


# ----------------------------------------------------------- checkpoints: unreadable, full disk ---

class _Iterator:
  """The data-iterator interface checkpoints use (grain's handler passes JSON bytes)."""

  def __init__(self, position=0):
    self.position = position

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = json.loads(state)["position"]

  def start_prefetch(self):
    pass


@pytest.fixture(name="states", scope="module")
def _states():
  """Two different train states of the tiny model (one device) and their restore target."""
  config = demo.get_config(f"size=tiny,vocab_size={VOCAB},steps=10,batch_size=8,seq_len=32")
  objective = registry.build(config, fake_tokenizer(VOCAB))
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, 10)
  first = nn.unbox(jax.jit(lambda r: state_lib.init_state(r, objective, tx, 32))(jax.random.key(0)))
  second = first.replace(step=first.step + 1,
                         params=jax.tree.map(lambda x: x + 1, first.params))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), first)
  return first, second, target


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_array_equal(x, y)


def _save_two(workdir, config, states):
  mngr = checkpointing.manager(workdir, config.train)
  checkpointing.save(mngr, 1, states[0], _Iterator(1), config)
  checkpointing.save(mngr, 2, states[1], _Iterator(2), config)
  checkpointing.wait(mngr)
  return mngr


def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny_config, states, tmp_path,
                                                                      caplog):
  _save_two(tmp_path, tiny_config, states)
  data = _largest_file(tmp_path / "checkpoints" / "2" / "state")  # The arrays of step 2.
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 2)
  mngr = checkpointing.manager(tmp_path, tiny_config.train)  # A rerun of the command.
  iterator = _Iterator()
  with caplog.at_level(logging.WARNING):
    restored = checkpointing.restore(mngr, states[2], iterator, tiny_config, tmp_path)
  _assert_same_params(restored, states[0])
  assert int(restored.step) == int(states[0].step) and iterator.position == 1
  assert "step(s) [2]" in caplog.text and "resumed from step 1" in caplog.text
  assert (tmp_path / checkpointing.UNREADABLE_DIR / "2").is_dir() and mngr.all_steps() == [1]
  # The run goes on and saves step 2 again.
  checkpointing.save(mngr, 2, states[1], _Iterator(2), tiny_config)
  checkpointing.wait(mngr)
  _assert_same_params(checkpointing.restore(mngr, states[2], _Iterator(), tiny_config, tmp_path),
                      states[1])


def test_no_readable_checkpoint_is_an_error_that_lists_each_step(tiny_config, states, tmp_path):
  _save_two(tmp_path, tiny_config, states)
  for step in (1, 2):
    (tmp_path / "checkpoints" / str(step) / "state" / "_METADATA").write_text("{")
  mngr = checkpointing.manager(tmp_path, tiny_config.train)
  with pytest.raises(RuntimeError, match=r"No checkpoint in .* can be read: step 2: .*; step 1: "):
    checkpointing.restore(mngr, states[2], _Iterator(), tiny_config, tmp_path)
  assert mngr.all_steps() == [1, 2]  # Nothing moved when nothing could be resumed.


def test_full_disk_while_saving_fails_loudly_and_keeps_the_last_checkpoint(tiny_config, states,
                                                                          tmp_path):
  """The failing writer is the OS: RLIMIT_FSIZE makes every write past 16 KiB of a file fail (EFBIG)
  in every thread of this process, tensorstore's included, like a disk that fills up mid-save (the
  step's array metadata alone is larger, so the save always fails, wherever the arrays land)."""
  mngr = checkpointing.manager(tmp_path, tiny_config.train)
  checkpointing.save(mngr, 1, states[0], _Iterator(1), tiny_config)
  checkpointing.wait(mngr)
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
  try:
    with pytest.raises(OSError, match=r"newest complete checkpoint, step 1, is intact.*rerun"):
      checkpointing.save(mngr, 2, states[1], _Iterator(2), tiny_config)
      checkpointing.wait(mngr)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  rerun = checkpointing.manager(tmp_path, tiny_config.train)
  assert rerun.all_steps() == [1]
  iterator = _Iterator()
  _assert_same_params(checkpointing.restore(rerun, states[2], iterator, tiny_config, tmp_path),
                      states[0])
  assert iterator.position == 1


# ------------------------------------------------------------------------ NaN and inf steps ---

class _NanWhenPoisoned:
  """The real objective, except that a batch holding a negative token id has a NaN loss (and so
  NaN gradients): a stand-in for an overflow or a corrupt row."""

  def __init__(self, inner):
    self.inner = inner

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def loss(self, params, state, batch, rng, train=True):
    loss, aux = self.inner.loss(params, state, batch, rng, train=train)
    return loss * jnp.where(jnp.any(batch["input_ids"] < 0), jnp.nan, 1.0), aux


def _poison(batch, row=0):
  batch = {k: np.array(v) for k, v in batch.items()}
  batch["input_ids"][row, 1] = -1
  return batch


def _step_fn(config, mode, accum_steps=1):
  config.model.num_layers = 1  # Cheaper to compile; the guard does not care.
  objective = _NanWhenPoisoned(registry.build(config, fake_tokenizer(VOCAB)))
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, 10)
  state = nn.unbox(jax.jit(lambda r: state_lib.init_state(r, objective, tx, 32))(jax.random.key(0)))
  step = jax.jit(lambda s, b: step_lib.train_step(s, b, jax.random.key(1), objective=objective, tx=tx,
                                               schedule=schedule, accum_steps=accum_steps,
                                               nonfinite=mode))
  return state, step


def test_stop_freezes_at_the_first_nonfinite_step_and_names_it(tiny_config):
  state, step = _step_fn(tiny_config, "stop")
  good = packed_batch(np.random.default_rng(0), 8, 32, VOCAB)
  s1, _ = step(state, good)
  s2, m2 = step(s1, _poison(good))
  s3, m3 = step(s2, good)  # Between two log steps: nothing is applied after the bad step either.
  for later in (s2, s3):
    _assert_same_params(later, s1)
    for a, b in zip(jax.tree.leaves(later.opt_state), jax.tree.leaves(s1.opt_state), strict=True):
      np.testing.assert_array_equal(a, b)
  assert int(s3.step) == 3 and int(s3.nonfinite.first_step) == 2
  assert nonfinite.names(s3.nonfinite.first_bits) == "loss, grad_norm, update_norm"
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(s3.params))
  fetched = {k: float(v) for k, v in jax.device_get(m3).items()}
  with pytest.raises(FloatingPointError, match=r"Non-finite loss, grad_norm, update_norm at step 2"
                                               r".*--config.train.nonfinite=skip"):
    nonfinite.check(4, fetched, "stop", log_every=4)
  with pytest.raises(FloatingPointError, match="at step 2"):
    nonfinite.raise_if_stopped(s3.nonfinite, "stop")
  assert float(m2["grad_norm"]) != float(m2["grad_norm"])  # The metrics show the NaN itself.


def test_skip_drops_exactly_the_nonfinite_update(tiny_config, caplog):
  tiny_config.optimizer.grad_accum_steps = 2
  state, step = _step_fn(tiny_config, "skip", accum_steps=2)
  good = packed_batch(np.random.default_rng(0), 8, 32, VOCAB)
  s1, _ = step(state, good)
  s2, _ = step(s1, _poison(good, row=3))  # Only micro-batch 1 (rows 1::2) is poisoned.
  _assert_same_params(s2, s1)
  assert int(s2.step) == 2 and int(s2.nonfinite.skipped) == 1
  s3, m3 = step(s2, good)
  expected, _ = step(s1.replace(step=s1.step + 1), good)  # As if step 2 had never happened.
  _assert_same_params(s3, expected)
  assert not np.array_equal(jax.tree.leaves(s3.params)[0], jax.tree.leaves(s1.params)[0])
  fetched = {k: float(v) for k, v in jax.device_get(m3).items()}
  with caplog.at_level(logging.WARNING):
    logged = nonfinite.check(3, fetched, "skip", log_every=2)
  assert logged["skipped_steps"] == 1 and not any(k.startswith("nonfinite_") for k in logged)
  assert "Skipped the non-finite update of step 2" in caplog.text


@pytest.fixture(name="poisoned_run")
def _poisoned_run(runs, monkeypatch):
  """In-process training on the e2e corpus whose `poison_at`-th batch makes the loss NaN."""
  corpus = runs[0].parent
  real_build, real_global_batch = registry.build, sharding.global_batch
  monkeypatch.setattr(registry, "build", lambda *args: _NanWhenPoisoned(real_build(*args)))

  def run(workdir, poison_at, batch_size=8, **train_config):
    calls = []

    def global_batch(batch, batch_sharding):
      calls.append(1)
      return real_global_batch(_poison(batch) if len(calls) == poison_at else batch, batch_sharding)

    monkeypatch.setattr(sharding, "global_batch", global_batch)
    config = demo.get_config(f"size=tiny,vocab_size=400,steps=8,batch_size={batch_size},seq_len=64")
    config.model.num_layers = 1
    config.data.update(name="local_text", paths=str(corpus / "code.jsonl"),
                       data_dir=str(corpus / "tfds"), validation_fraction=0.2)
    config.train.update(eval_batches=0, **train_config)
    return train.train_and_evaluate(config, str(workdir))
  return run


def test_nonfinite_between_log_steps_stops_before_any_checkpoint_of_it(poisoned_run, tmp_path):
  with pytest.raises(FloatingPointError, match=r"Non-finite loss, grad_norm, update_norm at step 5"):
    poisoned_run(tmp_path, poison_at=5, log_every=4, checkpoint_every=3, nonfinite="stop")
  for _ in range(600):  # In-process, step 3's async save may still be finishing.
    steps = checkpointing.manager(tmp_path, demo.get_config().train).all_steps()
    if steps:
      break
    time.sleep(0.05)
  assert steps == [3]
  rows = metrics.read_jsonl(str(tmp_path))
  assert [r["step"] for r in rows] == [4] and all(np.isfinite(v) for v in rows[0].values())


def test_skip_mode_trains_on_and_logs_the_skipped_step(poisoned_run, tmp_path):
  poisoned_run(tmp_path, poison_at=2, steps=4, log_every=2, checkpoint_every=4, nonfinite="skip")
  rows = metrics.read_jsonl(str(tmp_path))
  assert [(r["step"], r["skipped_steps"]) for r in rows] == [(2, 1.0), (4, 1.0)]
  assert np.isfinite(rows[-1]["mlm_loss"]) and np.isfinite(rows[-1]["param_norm"])


# -------------------------------------------------------------------------------- bad inputs ---

def test_bad_nonfinite_mode_names_the_key_and_the_choices():
  config = demo.get_config("size=tiny")
  config.train.nonfinite = "ignore"
  with pytest.raises(ValueError, match=r"train.nonfinite='ignore'; allowed: stop, skip"):
    common.validate(config)


def test_batch_not_divisible_by_the_data_parallel_size_is_explained(poisoned_run, tmp_path):
  """8 devices (tests/conftest.py), a global batch of 12: refused before anything compiles."""
  config = demo.get_config("size=tiny,batch_size=12")
  mesh = sharding.make_mesh(config.mesh)
  with pytest.raises(ValueError, match=r"data.batch_size=12 is not divisible by the 8 data-parallel "
                                       r"shards.*multiple of 8"):
    run_lib.check_batch_divides(12, sharding.batch_sharding(mesh, sharding.rules(config.axis_rules)))
  with pytest.raises(ValueError, match="data.batch_size=4 is not divisible by the 8"):
    poisoned_run(tmp_path, poison_at=0, batch_size=4, steps=1)


def test_missing_or_corrupt_tokenizer_is_named_with_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"Tokenizer .*spm.model does not exist; restore it"):
    tokenizer_lib.load(str(tmp_path / "workdir" / "tokenizer" / "spm.model"))
  (tmp_path / "spm.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match=r"spm.model is not a sentencepiece model.*delete it"):
    tokenizer_lib.load(str(tmp_path / "spm.model"))


def test_resuming_with_another_tokenizer_or_vocabulary_is_refused(tiny_config, tmp_path):
  a, b = tmp_path / "a.model", tmp_path / "b.model"
  a.write_bytes(b"tokenizer a")
  b.write_bytes(b"tokenizer b")
  copied = checkpointing.copy_tokenizer(str(a), str(tmp_path / "w"))
  assert open(copied, "rb").read() == b"tokenizer a"
  assert checkpointing.copy_tokenizer(str(a), str(tmp_path / "w")) == copied  # Same one: fine.
  with pytest.raises(ValueError, match=r"b.model differs from .*tokenizer/spm.model.*"
                                       r"--config.data.tokenizer.path="):
    checkpointing.copy_tokenizer(str(b), str(tmp_path / "w"))
  saved = json.loads(tiny_config.to_json_best_effort())
  tiny_config.data.tokenizer.vocab_size = 600
  with pytest.raises(ValueError, match=r"data.tokenizer.vocab_size=500 but the config says 600.*"
                                       r"--config.data.tokenizer.vocab_size=500"):
    checkpointing.check_compatible(saved, tiny_config, "w")


def test_restoring_another_model_shape_names_the_array(tiny_config, states, tmp_path):
  """`init_from` and export read a checkpoint without its config check: the shapes are checked."""
  mngr = _save_two(tmp_path, tiny_config, states)
  tiny_config.model.update(hidden_size=32, num_heads=2)
  objective = registry.build(tiny_config, fake_tokenizer(VOCAB))
  tx, _ = optimizer_lib.make_optimizer(tiny_config.optimizer, 10)
  other = nn.unbox(jax.eval_shape(lambda r: state_lib.init_state(r, objective, tx, 32), jax.random.key(0)))
  with pytest.raises(ValueError, match=r"holds params.encoder.embeddings.LayerNorm.bias with shape "
                                       r"\(64,\) but this model's is \(32,\): config.model"):
    checkpointing.restore_state_only(mngr, other)


# ------------------------------------------------------------------------------------ pickle ---

class _Payload:
  """Unpickling this creates a directory: proof that a loader ran code from the file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.mkdir, (self.marker,)


@pytest.fixture(name="payload")
def _payload(tmp_path):
  live = str(tmp_path / "live")
  pickle.loads(pickle.dumps(_Payload(live)))  # The payload does run code when unpickled...
  assert os.path.isdir(live)
  marker = tmp_path / "unpickled"
  yield pickle.dumps(_Payload(str(marker)))
  assert not marker.exists(), "a loader unpickled an untrusted file"  # ...and no loader did.


def test_pickle_weights_are_refused_on_import(payload, tmp_path, tiny_config):
  model = tmp_path / "model"
  model.mkdir()
  config = registry.encoder_config(tiny_config.model, VOCAB)
  (model / "config.json").write_text(json.dumps(hf_bert.hf_config(config)))
  (model / "pytorch_model.bin").write_bytes(payload)
  with pytest.raises(FileNotFoundError, match="only safetensors is read; pytorch_model.bin would "
                                              "need pickle"):
    hf_read.read_hf_encoder(str(model))
  with pytest.raises(FileNotFoundError, match="pytorch_model.bin would need pickle"):
    hf_read.load_state_dict(str(model))
  (model / "model.safetensors").write_bytes(payload)
  with pytest.raises(ValueError, match=r"model.safetensors: cannot read safetensors"):
    hf_read.read_hf_encoder(str(model))
  with pytest.raises(ValueError, match=r"model.safetensors: cannot read safetensors"):
    hf_read.load_state_dict(str(model))


def test_pickle_in_a_checkpoint_or_tokenizer_is_never_loaded(payload, states, tiny_config, tmp_path):
  mngr = _save_two(tmp_path, tiny_config, states)
  for path in (tmp_path / "checkpoints" / "2" / "state" / "_METADATA",
               tmp_path / "checkpoints" / "2" / "state.pkl", tmp_path / "checkpoints" / "ckpt.pkl"):
    path.write_bytes(payload)
  with pytest.raises(ValueError, match="Checkpoint step 2 in .* cannot be restored"):
    checkpointing.restore_state_only(mngr, states[2])
  _assert_same_params(checkpointing.restore(mngr, states[2], _Iterator(), tiny_config, tmp_path),
                      states[0])
  for name, error in (("spm.model", "is not a sentencepiece model"),
                      ("tokenizer.json", "not a Hugging Face tokenizer file")):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(ValueError, match=error):
      tokenizer_lib.load(str(tmp_path / name))


def test_no_load_path_can_unpickle():
  """Every module that reads checkpoints, exports, imports or tokenizers, read as source: no pickle
  (or dill, joblib, torch.load, numpy allow_pickle...) anywhere a file could reach."""
  banned_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                    "marshal"}
  banned_calls = {"torch.load", "np.load", "numpy.load", "pd.read_pickle", "pandas.read_pickle",
                  "torch.jit.load"}
  found, scanned = [], 0
  for package in ("pretrain", "objectives", "configs"):
    for directory, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if not name.endswith(".py"):
          continue
        path = os.path.join(directory, name)
        scanned += 1
        for node in ast.walk(python_code.parse(open(path, encoding="utf-8").read())):
          if isinstance(node, ast.Import):
            found += [(path, a.name) for a in node.names if a.name.split(".")[0] in banned_modules]
          elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
            found.append((path, node.module))
          elif isinstance(node, ast.Call) and ast.unparse(node.func) in banned_calls:
            found.append((path, ast.unparse(node.func)))
          elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            found.append((path, "allow_pickle"))
  assert scanned > 20 and not found, found


def test_resume_checks_only_the_shape_keys_of_the_objective_in_use(tiny_config):
  """A key only another objective reads (ERNIE-Gram's lexicon size on an MLM run) may change."""
  mlm = registry.build(tiny_config, fake_tokenizer(VOCAB))
  saved = json.loads(tiny_config.to_json_best_effort())
  tiny_config.objective.ngram_vocab_size += 1
  tiny_config.objective.queue_size *= 2
  checkpointing.check_compatible(saved, tiny_config, "w",
                                 checkpointing.SHAPE_FIELDS + mlm.shape_fields)
  tiny_config.objective.name = "electra"
  saved = json.loads(tiny_config.to_json_best_effort())
  tiny_config.objective.generator_size_fraction = 0.5
  electra = registry.build(tiny_config, fake_tokenizer(VOCAB))
  with pytest.raises(ValueError, match=r"objective.generator_size_fraction=0.25 but the config "
                                       r"says 0.5"):
    checkpointing.check_compatible(saved, tiny_config, "w",
                                   checkpointing.SHAPE_FIELDS + electra.shape_fields)
