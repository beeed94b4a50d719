"""Pretraining: `train_and_evaluate(config, workdir)`, built from the shared run set-up.

Sections: setup (validate, tokenizer, objective and what it needs, data) -> state (resume >
init_from > scratch) -> loop (pretrain/training/loop.py: step, log one step late, evaluate,
checkpoint) -> finish (wait for the last save).
"""
import functools
import os
import time

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from objectives import registry
from configs import common
from pretrain import probes
from pretrain.data import (mixture, ngrams, pair_files, pairs, pipeline, sources,
                           tokenizer as tokenizer_lib)
from pretrain.interop import files, hf_read, load, student_init
from pretrain.models import stacking
from pretrain.training import flops as flops_lib
from pretrain.training import threefry
from pretrain.training import (checkpointing, metrics as metrics_lib, optimizer as optimizer_lib,
                               run as run_lib, state as state_lib, step as step_lib, workdir_lock)


def make_dataset(objective, resources, source, tokenizer, **kwargs):
  """The input pipeline of the objective's `input_format` over `source`."""
  if objective.input_format == "pairs":
    return pairs.make_dataset(source, tokenizer, **kwargs, **objective.dataset_options())
  dataset = pipeline.make_dataset(source, tokenizer, **kwargs)
  if objective.input_format == "packed_ngrams":
    dataset = dataset.map(ngrams.NgramFeatures(resources.lexicon))
  return dataset


def train_and_evaluate(config, workdir):
  """Pretrains `config` in `workdir`, resuming from its latest checkpoint; returns final metrics."""
  # --- Setup -------------------------------------------------------------------------------
  common.validate(config)
  _check_init_from(config)
  threefry.set_cpu_lowering(config.threefry_unrolled)
  t0 = time.perf_counter()
  d, t = config.data, config.train
  run = run_lib.start(config, workdir, {"data.batch_size": d.batch_size})
  tokenizer = tokenizer_lib.load_or_train(d)
  resources = load.resources(config, tokenizer)
  objective = registry.build(config, tokenizer, resources)
  student = _student_from_teacher(config, objective) if config.get("init_from_layers") else None
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, t.steps)
  mixed = mixture.parse(d.get("mixture", ""))

  def make_data(split, paths="", **kwargs):
    source = (pair_files.open_split(d, split, paths) if paths
              else sources.open_source(d, split))
    return make_dataset(objective, resources, source, tokenizer,
                        seq_len=d.seq_len, batch_size=d.batch_size,
                        process_index=jax.process_index(), process_count=jax.process_count(),
                        seed=d.seed, **kwargs)

  if mixed:
    train_iter = iter(mixture.MixtureIterDataset(
        {name: make_data(d.train_split, paths) for name, paths, _ in mixed},
        [w for *_, w in mixed], d.mixture_mode, d.seed,
        pipeline.local_batch_size(d.batch_size, jax.process_count())))
  else:
    train_iter = iter(make_data(d.train_split))
  eval_sets = {}  # Evaluation rows per source ("" without a mixture), metrics prefixed by it.
  if t.eval_batches:
    for name, paths in ([(n, p) for n, p, _ in mixed] or [("", "")]):
      eval_data = make_data(d.eval_split, paths, shuffle=False, num_epochs=1)
      eval_sets[name] = list(_take_padded(iter(eval_data), t.eval_batches, d,
                                          jax.process_count(), objective.example_batch(d.seq_len)))
  init_rng, eval_rng, rng = jax.random.split(jax.random.key(config.seed, impl=config.rng_impl), 3)
  run_lib.open_workdir(run, objective, tx, d.seq_len)
  workdir_lock.in_process_0(checkpointing.copy_tokenizer, tokenizer.model_path, workdir)

  # --- State: resume > init_from > scratch ---------------------------------------------------
  def init_params(params, param_shardings):
    if not config.init_from:
      return params
    if student is not None:
      return jax.device_put(stacking.stack_like({**params, **student}, params), param_shardings)
    return _params_from(config.init_from, params, objective, tx, d.seq_len, run.mesh, run.rules,
                        param_shardings)

  state, shardings = run_lib.restore_or_init(
      run, objective, tx, d.seq_len, init_rng, train_iter,
      checkpointing.SHAPE_FIELDS + checkpointing.DATA_FIELDS + objective.shape_fields, init_params)
  start = int(state.step)
  run.writer.truncate_after(start if start else -1)  # From scratch, step 0's evaluation runs again.

  # --- Compiled functions -------------------------------------------------------------------
  step_fn = run_lib.compile_step(run, objective, tx, schedule, shardings)
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, objective=objective))
  eval_sets = {name: [run_lib.to_device(run, b) for b in batches]
               for name, batches in eval_sets.items()}
  final = {}

  suite = probe_suite(config, objective, tokenizer)

  def run_eval(step, state):
    result = {}
    for name, batches in eval_sets.items():
      with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
        scores = step_lib.evaluate(eval_fn, state, batches, eval_rng)
      result.update({(f"eval_{name}_{k[len('eval_'):]}" if name else k): v
                     for k, v in scores.items()})
    if suite is not None and (step % t.probe_every == 0 or step == t.steps):
      result.update(suite(gathered(objective.encoder(state.params))))
    if result:
      run.writer.write(step, result)
      metrics_lib.console_line(step, t.steps, result)
    return result

  evaluate = run_eval if eval_sets or suite is not None else None
  if start == 0 and evaluate is not None:
    final.update(run_eval(0, state))
  logging.info("Setup took %.1fs; training steps %d..%d.", time.perf_counter() - t0, start, t.steps)

  # --- Loop and finish ------------------------------------------------------------------------
  state, logged = run_lib.train(run, state, step_fn, train_iter, rng, start_step=start,
                                tokens_per_step=d.batch_size * metrics_lib.tokens_per_example(
                                    objective.example_batch(d.seq_len)),
                                evaluate=evaluate, layer_flops_scale=layer_flops_scale(
                                    config, objective, tokenizer, resources, tx, schedule, run))
  final.update(logged)
  run_lib.finish(run)
  return final


def layer_flops_scale(config, objective, tokenizer, resources, tx, schedule, run):
  """1.0, or for scanned layers (XLA's cost analysis counts a loop body once) the FLOPs of the
  unrolled twin of the train step over the scanned step's, both lowered (not compiled) from
  abstract arrays, so that MFU counts every layer."""
  if not objective.model_config.scan_layers:
    return 1.0
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_layers = False
  d, counts = config.data, []
  for model in (registry.build(unrolled, tokenizer, resources), objective):
    target, shardings = state_lib.abstract_state(model, tx, d.seq_len, run.mesh, run.rules)
    batch = {k: jax.ShapeDtypeStruct((d.batch_size, *np.shape(v)[1:]), np.asarray(v).dtype,
                                     sharding=run.batch_sharding)
             for k, v in model.example_batch(d.seq_len).items()}
    step = run_lib.compile_step(run, model, tx, schedule, shardings)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
      counts.append(flops_lib.step_flops(step, target, batch,
                                         jax.random.key(0, impl=config.rng_impl)))
  return counts[0] / counts[1] if counts[1] > 0 else 1.0


def probe_suite(config, objective, tokenizer):
  """The downstream probes run with the evaluations (`train.probe_every` > 0), else None."""
  t, d = config.train, config.data
  if not t.probe_every:
    return None
  budget = probes.ProbeBudget(max_train=t.probe_rows, max_dev=max(1, t.probe_rows // 4),
                              max_test=t.probe_rows, seq_len=min(128, config.model.max_len),
                              max_candidates=t.probe_rows, max_files=t.probe_max_files)
  # The held-out stdlib files are this corpus's validation split when it is the stdlib corpus.
  fraction = d.validation_fraction if d.name == "python_stdlib" else 0.05
  started = time.perf_counter()
  suite = probes.ProbeSuite([s.strip() for s in t.probe_tasks.split(",")],
                            objective.model_config, tokenizer, budget, seed=config.seed,
                            validation_fraction=fraction)
  logging.info("Probe data built in %.1fs.", time.perf_counter() - started)
  return suite


def gathered(tree):
  """Every process's copy of a sharded tree (the probes run the same on each process)."""
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.process_allgather(tree, tiled=True)


def _take_padded(iterator, n, data_config, process_count, example):
  """Exactly `n` eval batches per process (all-padding ones, shaped like the rows of `example`,
  once the split runs out)."""
  rows = data_config.batch_size // process_count
  for _ in range(n):
    batch = next(iterator, None)
    if batch is None:
      batch = {k: np.zeros((rows, *np.shape(v)[1:]), np.int32) for k, v in example.items()}
    yield batch


# What `init_from` of a workdir needs to match: the keys that decide parameter shapes (RoPE bases
# and windows may change: that is a context extension; a rotary model has no position table).
_NOT_SHAPES = ("model.rope_theta", "model.rope_local_theta", "model.local_window",
               "model.global_every", "model.layer_norm_eps", *checkpointing.LAYOUT_FIELDS)


def _check_init_from(config):
  """Before anything runs or is written: `init_from` names a Hugging Face directory, or a
  pretraining workdir whose model has this run's shapes."""
  path = config.init_from
  if not path or config.get("init_from_layers") or os.path.isfile(
      os.path.join(path, files.CONFIG_FILE)):
    return  # A student cut from a teacher is checked by `_student_from_teacher`.
  if not load.is_workdir(path):
    raise FileNotFoundError(
        f"config.init_from={path!r} is neither a pretraining workdir (no "
        f"{checkpointing.CHECKPOINTS_DIR}/) nor a Hugging Face directory (no {files.CONFIG_FILE}); "
        "check the path, or leave it empty to start from scratch.")
  mngr = checkpointing.read_manager(path, "config.init_from")
  saved = checkpointing.saved_config(mngr, checkpointing.pick_step(mngr, what="config.init_from"))
  if "task" in saved:
    raise ValueError(f"config.init_from={path!r} is a fine-tuning workdir; give the pretraining "
                     "workdir (or export) it started from.")
  skip = _NOT_SHAPES + (("model.max_len",) if config.model.position == "rope" else ())
  fields = [f for f in checkpointing.SHAPE_FIELDS if f not in skip]
  try:
    checkpointing.check_compatible(saved, config, path, fields)
  except ValueError as e:
    raise ValueError(f"config.init_from: {e.args[0].split(' Use --config')[0]} Starting from it "
                     "needs the same model shape: use its values, or leave config.init_from "
                     "empty.") from None


def _student_from_teacher(config, objective):
  """`init_from_layers`: the student's encoder (and MLM head) cut from the init_from teacher, as
  numpy trees; raises before anything is written when the student is not a part of it."""
  pretrained = load.load_encoder(config.init_from, what="config.init_from")
  shapes = nn.unbox(jax.eval_shape(objective.init, jax.random.key(0),
                                   objective.example_batch(config.data.seq_len)))
  shapes = jax.eval_shape(stacking.unstack_all, shapes)  # The teacher's canonical layout.
  logging.info("Cutting the student from %s (layers: %s).", config.init_from,
               config.init_from_layers)
  return student_init.student_params(pretrained, config.init_from_layers, objective.model_config,
                                     shapes, config.init_from)


def _params_from(path, params, objective, tx, seq_len, mesh, rules, param_shardings):
  """Parameters of another run's workdir, or the encoder (and the MLM / discriminator heads it
  has) of a Hugging Face BERT, ELECTRA or RoBERTa directory, plus what the objective's
  `import_extras` reads from an export of it (RetroMAE's decoder, a contrastive pooler), placed
  with this run's shardings, in its layout (layers stacked under model.scan_layers, whatever the
  source's); other parameters keep their fresh values."""
  if os.path.isfile(os.path.join(path, files.CONFIG_FILE)):
    imported = hf_read.read_hf_encoder(path)
    loaded = stacking.stack_like({"encoder": imported.encoder, **imported.heads}, params)
    for name, tree in loaded.items():
      if name in params:
        state_lib.check_same_shapes(tree, params[name], f"{path} ({name})")
    params = {**params, **{k: v for k, v in loaded.items() if k in params}}
    params = objective.import_extras(path, params)
  else:
    mngr = checkpointing.read_manager(path, "config.init_from")
    saved = checkpointing.saved_config(mngr).get("model", {})
    ours = objective.model_config
    # A layout changes with scan_layers, and, scanned, with the group (global_every, local_window).
    same_layout = (saved.get("scan_layers", False) == ours.scan_layers and (
        not ours.scan_layers or (saved.get("global_every"), bool(saved.get("local_window")))
        == (ours.global_every, bool(ours.local_window))))
    if same_layout:
      target, _ = state_lib.abstract_state(objective, tx, seq_len, mesh, rules)
      with jax.set_mesh(mesh):
        params = checkpointing.restore_state_only(mngr, target).params
    else:  # The other layout: read it canonical (every layer_{i}), then lay it out as this run's.
      params = stacking.stack_like(load.load_workdir(path).params, params)
  logging.info("Initialised parameters from %s.", path)
  return jax.device_put(params, param_shardings)
