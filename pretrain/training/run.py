"""The run set-up that pretraining and fine-tuning share, in the order they use it.

  run = start(config, workdir, batch_sizes)          # lock, preemption watch, mesh, rules
  ... tokenizer, data, model: the caller's ...
  open_workdir(run, model, tx, seq_len)              # placement, metrics, Orbax
  state, shardings = restore_or_init(run, ...)       # resume > init_params(fresh) > fresh
  step_fn = compile_step(run, model, tx, ...)        # jit with shardings and donation
  state, logged = train(run, state, step_fn, ...)    # pretrain/training/loop.py
  finish(run)                                        # wait for the last save, close files

Only `config.mesh`, `config.axis_rules`, `config.train` and `config.optimizer.grad_accum_steps`
are read here; everything model- or data-specific is an argument.
"""
import dataclasses
import functools
import math
import os
from typing import Any, Callable, Optional

import jax
from absl import logging

from pretrain.training import (checkpointing, loop, metrics as metrics_lib, sharding,
                               state as state_lib, step as step_lib, workdir_lock)


@dataclasses.dataclass
class Run:
  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  rules: Any
  batch_sharding: jax.sharding.NamedSharding
  preempted: Any  # threading.Event set by SIGTERM
  writer: Optional[metrics_lib.MetricWriter] = None  # open_workdir
  mngr: Any = None  # orbax CheckpointManager; open_workdir
  target: Any = None  # the train state's ShapeDtypeStructs with shardings; open_workdir
  shardings: Any = None


def check_batch_divides(batch_size, batch_sharding, key="data.batch_size"):
  """The global batch must split evenly over the mesh axes that the `batch` rule names."""
  axes = batch_sharding.spec[0] or ()
  axes = (axes,) if isinstance(axes, str) else axes
  shards = math.prod(batch_sharding.mesh.shape[a] for a in axes)
  if batch_size % shards:
    raise ValueError(
        f"{key}={batch_size} is not divisible by the {shards} data-parallel shards "
        f"(mesh axes {'*'.join(axes)} = {shards}); make {key} a multiple of {shards} or "
        f"change config.mesh.")


def start(config, workdir, batch_sizes: dict[str, int]) -> Run:
  """Locks the workdir (a second run on it stops here, before any work), watches for SIGTERM
  (a SIGTERM during set-up still ends cleanly), then builds the mesh and checks that every batch
  size in `batch_sizes` ({config key: size}) divides over it."""
  workdir_lock.acquire(workdir)
  preempted = loop.watch_for_preemption()
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.axis_rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  for key, size in batch_sizes.items():
    check_batch_divides(size, batch_sharding, key)
  return Run(config, workdir, mesh, rules, batch_sharding, preempted)


def open_workdir(run: Run, model, tx, seq_len) -> None:
  """Places the train state of `model` on the mesh (a dimension the mesh cannot split stops here),
  then opens the metric files and the checkpoint manager: the first writes into the workdir
  besides its lock, so they come after every check of the config, the data and the model."""
  run.target, run.shardings = state_lib.abstract_state(model, tx, seq_len, run.mesh, run.rules)
  sharding.assert_sufficiently_sharded(run.target.params, run.mesh)
  run.writer = metrics_lib.MetricWriter(run.workdir, enabled=jax.process_index() == 0)
  run.mngr = checkpointing.manager(run.workdir, run.config.train)


def restore_or_init(run: Run, model, tx, seq_len, rng, data_iterator, shape_fields,
                    init_params: Optional[Callable] = None):
  """(state, shardings): the workdir's latest checkpoint (with the data iterator's position), else
  a fresh sharded init whose params `init_params(params, param_shardings)` may replace."""
  shardings = run.shardings
  with jax.set_mesh(run.mesh):
    state = checkpointing.restore(run.mngr, run.target, data_iterator, run.config, run.workdir,
                                  shape_fields)
  if state is not None:
    logging.info("Resumed from %s at step %d.", run.workdir, int(state.step))
  else:
    state, _ = state_lib.sharded_init(rng, model, tx, seq_len, run.mesh, run.rules)
    if init_params is not None:
      state = state.replace(params=init_params(state.params, shardings.params))
  return state, shardings


def compiler_options(train_config) -> dict | None:
  """XLA options of the train step's compile: train.cpu_scheduler's on CPU, none elsewhere."""
  name = train_config.cpu_scheduler
  if jax.default_backend() != "cpu" or name == "default":
    return None
  return {"xla_cpu_scheduler_type": f"CPU_SCHEDULER_TYPE_{name.upper()}"}


def compile_step(run: Run, model, tx, schedule, shardings):
  """The jitted `step.train_step` of `model` with the run's shardings; the state is donated."""
  return jax.jit(
      functools.partial(step_lib.train_step, objective=model, tx=tx, schedule=schedule,
                        accum_steps=run.config.optimizer.grad_accum_steps,
                        nonfinite=run.config.train.nonfinite),
      in_shardings=(shardings, run.batch_sharding, None), out_shardings=(shardings, None),
      donate_argnums=0, compiler_options=compiler_options(run.config.train))


def to_device(run: Run, batch):
  """This process's rows of a batch -> the global, sharded batch."""
  return sharding.global_batch(batch, run.batch_sharding)


def train(run: Run, state, step_fn, data_iterator, rng, *, start_step, tokens_per_step,
          evaluate=None, layer_flops_scale=1.0):
  """The shared loop (loop.run) with this run's checkpointing; returns (state, logged metrics).
  `layer_flops_scale` corrects XLA's FLOP count of a step whose layers are scanned (it counts the
  scanned body once): the unrolled step's FLOPs over the scanned one's."""
  def save(step, state):
    checkpointing.save(run.mngr, step, state, data_iterator, run.config)
  return loop.run(
      state, step_fn, lambda: to_device(run, next(data_iterator)), rng, start=start_step,
      train_config=run.config.train, tokens_per_step=tokens_per_step, writer=run.writer,
      mesh=run.mesh, rules=run.rules, preempted=run.preempted, save=save, evaluate=evaluate,
      profile_dir=os.path.join(run.workdir, "profile"),
      flops_scale=_flops_scale(run.config) * layer_flops_scale)


def _flops_scale(config):
  """XLA counts a loop body once: the step runs grad_accum_steps micro-batches. GradCache's
  chunked re-encoding would be counted once per step and recomputed: no MFU then (0)."""
  objective = config.get("objective") or {}
  if objective.get("grad_cache_chunk", 0):
    return 0.0
  return float(config.optimizer.get("grad_accum_steps", 1))


def finish(run: Run):
  """Waits for the last (async) save and closes the checkpoint manager and the metric files."""
  checkpointing.wait(run.mngr)
  run.mngr.close()
  run.writer.close()
  workdir_lock.release(run.workdir)
