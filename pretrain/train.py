"""The training loop: `train_and_evaluate(config, workdir)` and the pure, jitted train step.

Sections: setup (mesh, tokenizer, data, objective, optimizer) -> state (sharded init or restore)
-> loop (pretrain/loop.py: step, log one step late, evaluate, checkpoint) -> finish (wait for the
last save).
"""
import functools
import math
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

import objectives
from configs import common
from objectives import base
from pretrain import (checkpointing, hf_bert, hf_import, loop, metrics as metrics_lib,
                      nonfinite as nonfinite_lib, optimizer as optimizer_lib, sharding)
from pretrain.data import pipeline, sources, tokenizer as tokenizer_lib
from pretrain.models import encoder as enc


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  obj_state: Any
  nonfinite: Any  # nonfinite.NonFinite: steps whose loss, gradients or update were NaN/inf


def encoder_config(config, vocab_size):
  m = config.model
  return enc.EncoderConfig(
      vocab_size=vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
      num_heads=m.num_heads, mlp_dim=m.mlp_dim, max_len=m.max_len, dropout_rate=m.dropout_rate,
      dtype=m.dtype, embedding_size=m.get("embedding_size", 0) or None)


def make_objective(config, tokenizer):
  model_config = encoder_config(config, config.data.tokenizer.vocab_size)
  objective_class = objectives.get(config.objective.name)
  # An objective that needs more than its own config block (ERNIE-Gram: the data config, to find
  # or build its n-gram lexicon) builds itself from the run config.
  if hasattr(objective_class, "from_run_config"):
    return objective_class.from_run_config(config, model_config, tokenizer)
  return objective_class(config.objective, model_config, tokenizer)


def _example_batch(objective, seq_len):
  """What `init` traces: one row of every feature, unless the objective shapes its own."""
  if hasattr(objective, "example_batch"):
    return objective.example_batch(seq_len)
  return {f: jnp.ones((1, seq_len), jnp.int32) for f in objective.features}


def init_state(rng, objective, tx, seq_len):
  """A fresh TrainState whose parameters (and optimizer moments) keep their logical-axis boxes."""
  params = objective.init(rng, _example_batch(objective, seq_len))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    obj_state=objective.init_state(), nonfinite=nonfinite_lib.init())


def sharded_init(rng, objective, tx, seq_len, mesh, axis_rules):
  """Shardings from `eval_shape` -> logical specs, then an init that lands directly in place."""
  init = functools.partial(init_state, objective=objective, tx=tx, seq_len=seq_len)
  shardings = sharding.logical_shardings(jax.eval_shape(init, rng), mesh, axis_rules)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def abstract_state(objective, tx, seq_len, mesh, axis_rules):
  """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
  init = functools.partial(init_state, objective=objective, tx=tx, seq_len=seq_len)
  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh, axis_rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed), shardings), shardings


def _split_micro(batch, n):
  """[B, ...] -> [n, B/n, ...] taking rows i::n, so each device's rows spread over all micro-batches."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def train_step(state, batch, rng, *, objective, tx, schedule, accum_steps, nonfinite="stop"):
  """One optimizer update (over `accum_steps` micro-batches); pure, jitted at the call site.

  An update from a non-finite loss, gradient or update is never applied (`nonfinite.guard`;
  `nonfinite` is config.train.nonfinite: "stop" or "skip").
  """
  rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(functools.partial(objective.loss, train=True), has_aux=True)

  def micro(carry, xs):
    grads, metrics, obj_state, loss = carry
    mb, i = xs
    (l, (m, obj_state)), g = grad_fn(state.params, obj_state, mb, jax.random.fold_in(rng, i))
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m), obj_state,
            loss + l), None

  if accum_steps == 1:
    (loss, (metrics, obj_state)), grads = grad_fn(state.params, state.obj_state, batch, rng)
  else:
    micro_batches = _split_micro(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    shapes = jax.eval_shape(grad_fn, state.params, state.obj_state, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1][0]))
    (grads, metrics, obj_state, loss), _ = jax.lax.scan(
        micro, (*zeros, state.obj_state, jnp.zeros((), shapes[0][0].dtype)),
        (micro_batches, jnp.arange(accum_steps)))
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  norms = dict(loss=loss, grad_norm=optax.global_norm(grads), update_norm=optax.global_norm(updates))
  apply, health = nonfinite_lib.guard(state.nonfinite, state.step, nonfinite, norms)
  params, opt_state, obj_state = nonfinite_lib.select(
      apply, (optax.apply_updates(state.params, updates), opt_state, obj_state),
      (state.params, state.opt_state, state.obj_state))
  scalars = base.metric_values(metrics)
  scalars.update(grad_norm=norms["grad_norm"], update_norm=norms["update_norm"],
                 param_norm=optax.global_norm(params), learning_rate=schedule(state.step),
                 **nonfinite_lib.scalars(health))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            obj_state=obj_state, nonfinite=health)
  return new_state, scalars


def eval_step(params, obj_state, batch, rng, *, objective):
  """Metric `(total, count)` sums of one batch; the same masks every evaluation (fixed rng)."""
  _, (metrics, _) = objective.loss(params, obj_state, batch, rng, train=False)
  return metrics


def evaluate(eval_fn, state, batches, rng):
  totals = None
  for batch in batches:
    m = eval_fn(state.params, state.obj_state, batch, rng)
    totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
  return {f"eval_{k}": float(v) for k, v in jax.device_get(base.metric_values(totals)).items()}


def train_and_evaluate(config, workdir):
  """Pretrains `config` in `workdir`, resuming from its latest checkpoint; returns final metrics."""
  # --- Setup -------------------------------------------------------------------------------
  common.validate(config)
  preempted = loop.watch_for_preemption()  # Early: a SIGTERM during setup still ends cleanly.
  t0 = time.perf_counter()
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.axis_rules)
  d, t = config.data, config.train
  tokenizer = tokenizer_lib.load_or_train(d)
  if jax.process_index() == 0:
    checkpointing.copy_tokenizer(tokenizer.model_path, workdir)
  objective = make_objective(config, tokenizer)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, t.steps)
  # An objective with its own input format (pairs, crops...) provides `make_dataset`.
  make_dataset = getattr(objective, "make_dataset", pipeline.make_dataset)
  make_data = functools.partial(make_dataset, tokenizer=tokenizer, seq_len=d.seq_len,
                                batch_size=d.batch_size, process_index=jax.process_index(),
                                process_count=jax.process_count())
  train_iter = iter(make_data(sources.open_source(d, d.train_split), seed=d.seed))
  eval_batches = []
  if t.eval_batches:
    eval_data = make_data(sources.open_source(d, d.eval_split), seed=d.seed, shuffle=False,
                          num_epochs=1)
    eval_batches = list(_take_padded(iter(eval_data), t.eval_batches, d, jax.process_count(),
                                      _example_batch(objective, d.seq_len)))
  batch_sharding = sharding.batch_sharding(mesh, rules)
  _check_batch_divides(d.batch_size, batch_sharding)
  init_rng, eval_rng, rng = jax.random.split(jax.random.key(config.seed, impl=config.rng_impl), 3)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)

  # --- State: resume > init_from > scratch ---------------------------------------------------
  mngr = checkpointing.manager(workdir, t)
  target, shardings = abstract_state(objective, tx, d.seq_len, mesh, rules)
  with jax.set_mesh(mesh):
    state = checkpointing.restore(mngr, target, train_iter, config, workdir,
                                  checkpointing.SHAPE_FIELDS + objective.shape_fields)
  if state is not None:
    logging.info("Resumed from %s at step %d.", workdir, int(state.step))
  else:
    state, _ = sharded_init(init_rng, objective, tx, d.seq_len, mesh, rules)
    if config.init_from:
      state = state.replace(params=_params_from(config.init_from, state.params, objective, tx,
                                                d.seq_len, mesh, rules, shardings.params))
  sharding.assert_sufficiently_sharded(state.params, mesh)
  start = int(state.step)
  writer.truncate_after(start if start else -1)  # From scratch, step 0's evaluation runs again.

  # --- Compiled functions -------------------------------------------------------------------
  step_fn = jax.jit(
      functools.partial(train_step, objective=objective, tx=tx, schedule=schedule,
                        accum_steps=config.optimizer.grad_accum_steps, nonfinite=t.nonfinite),
      in_shardings=(shardings, batch_sharding, None), out_shardings=(shardings, None),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, objective=objective))
  to_device = lambda b: sharding.global_batch(b, batch_sharding)  # noqa: E731
  eval_batches = [to_device(b) for b in eval_batches]
  final = {}

  def run_eval(step, state):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      result = evaluate(eval_fn, state, eval_batches, eval_rng)
    writer.write(step, result)
    metrics_lib.console_line(step, t.steps, result)
    return result

  if start == 0 and eval_batches:
    final.update(run_eval(0, state))
  logging.info("Setup took %.1fs; training steps %d..%d.", time.perf_counter() - t0, start, t.steps)

  # --- Loop ----------------------------------------------------------------------------------
  save = lambda step, state: checkpointing.save(mngr, step, state, train_iter, config)  # noqa: E731
  state, logged = loop.run(
      state, step_fn, lambda: to_device(next(train_iter)), rng, start=start, train_config=t,
      tokens_per_step=d.batch_size * d.seq_len, writer=writer, mesh=mesh, rules=rules,
      preempted=preempted, save=save, evaluate=run_eval if eval_batches else None)
  final.update(logged)

  # --- Finish --------------------------------------------------------------------------------
  checkpointing.wait(mngr)
  mngr.close()
  writer.close()
  return final


def _check_batch_divides(batch_size, batch_sharding):
  """The global batch must split evenly over the mesh axes that the `batch` rule names."""
  axes = batch_sharding.spec[0] or ()
  axes = (axes,) if isinstance(axes, str) else axes
  shards = math.prod(batch_sharding.mesh.shape[a] for a in axes)
  if batch_size % shards:
    raise ValueError(
        f"data.batch_size={batch_size} is not divisible by the {shards} data-parallel shards "
        f"(mesh axes {'*'.join(axes)} = {shards}); make data.batch_size a multiple of {shards} or "
        f"change config.mesh.")


def _take_padded(iterator, n, data_config, process_count, example):
  """Exactly `n` eval batches per process (all-padding ones, shaped like the rows of `example`,
  once the split runs out)."""
  rows = data_config.batch_size // process_count
  for _ in range(n):
    batch = next(iterator, None)
    if batch is None:
      batch = {k: np.zeros((rows, *np.shape(v)[1:]), np.int32) for k, v in example.items()}
    yield batch


def _params_from(path, params, objective, tx, seq_len, mesh, rules, param_shardings):
  """Parameters of another run's workdir, or the encoder (and the MLM / discriminator heads it
  has) of a Hugging Face BERT, ELECTRA or RoBERTa directory, plus what the objective's
  `import_extras` reads from an export of it (RetroMAE's decoder, a contrastive pooler), placed
  with this run's shardings; other parameters keep their fresh values."""
  if os.path.isfile(os.path.join(path, hf_bert.CONFIG_FILE)):
    imported = hf_import.read_hf_encoder(path)
    loaded = {"encoder": imported.encoder, **imported.heads}
    for name, tree in loaded.items():
      if name in params:
        _check_same_shapes(tree, params[name], f"{path} ({name})")
    params = {**params, **{k: v for k, v in loaded.items() if k in params}}
    if hasattr(objective, "import_extras"):  # What the objective's export_extras wrote there.
      params = objective.import_extras(path, params)
  else:
    mngr = checkpointing.ocp.CheckpointManager(checkpointing.checkpoint_dir(path))
    target, _ = abstract_state(objective, tx, seq_len, mesh, rules)
    with jax.set_mesh(mesh):
      params = checkpointing.restore_state_only(mngr, target).params
  logging.info("Initialised parameters from %s.", path)
  return jax.device_put(params, param_shardings)


def _check_same_shapes(loaded, expected, where):
  flat_loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  for key, value in jax.tree_util.tree_flatten_with_path(expected)[0]:
    got = flat_loaded.get(key)
    if got is None or np.shape(got) != value.shape:
      raise ValueError(f"init_from {where}: parameter {jax.tree_util.keystr(key)} is "
                       f"{None if got is None else np.shape(got)} there but {value.shape} in this "
                       f"model; make config.model match the checkpoint.")
