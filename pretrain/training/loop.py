"""The step loop that pretraining and fine-tuning share: log, evaluate, checkpoint, preempt.

One loop, so both keep the same guarantees: metrics are fetched one step late (dispatch stays
asynchronous, no per-step host sync), a non-finite step never reaches a checkpoint
(`train.nonfinite`), and SIGTERM (what TPU VMs and SLURM send before they take a machine) saves
the current step and stops cleanly, every process at the same step.
"""
from __future__ import annotations

import functools
import math
import signal
import threading
import time

import flax.linen as nn
import jax
from absl import logging
from jax.experimental import multihost_utils

from pretrain.training import flops as flops_lib, metrics as metrics_lib, nonfinite as nonfinite_lib


def watch_for_preemption():
  """An event that SIGTERM sets; install it early, so a SIGTERM during setup still ends cleanly."""
  event = threading.Event()
  # With several processes jax.distributed's own handler catches SIGTERM; keep it.
  if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, lambda *_: event.set())
  return event


def reached_preemption(event, step):
  """True at the step boundary where every process should save and stop."""
  if jax.process_count() > 1:
    # The preemption service makes every process agree on the same step.
    return multihost_utils.reached_preemption_sync_point(step)
  return event.is_set()


def check_finite(step, scalars):
  for name, value in scalars.items():
    if not math.isfinite(value):
      raise FloatingPointError(f"Non-finite {name}={value} at step {step}: the run stopped instead of "
                               f"training on; lower optimizer.learning_rate or check the data.")


def log_scalars(writer, throughput, train_config, step, scalars):
  """Fetches a step's device metrics, checks them, and writes the metrics row and console line."""
  scalars = {k: float(v) for k, v in jax.device_get(scalars).items()}
  scalars = nonfinite_lib.check(step, scalars, train_config.nonfinite, train_config.log_every)
  if train_config.nonfinite == "stop":
    check_finite(step, scalars)
  speed, eta = throughput.update(step)
  writer.write(step, {**scalars, **speed})
  metrics_lib.console_line(step, train_config.steps, scalars, speed, eta)
  writer.flush()
  return scalars


def profile_range(value: str) -> tuple[int, int] | None:
  """train.profile_steps "START:END" -> (START, END); "" -> None."""
  if not value:
    return None
  start, _, end = value.partition(":")
  return int(start), int(end)


class Profiler:
  """train.profile_steps: a trace from step START to END - 1, stopped early if the loop ends (a
  resume past START traces nothing rather than stopping a trace that never started)."""

  def __init__(self, value: str, directory: str):
    self.span = profile_range(value) if directory else None
    self.directory, self.active = directory, False

  def before(self, step):
    if self.span and step == self.span[0] and not self.active:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True

  def after(self, step, state):
    if self.active and step >= self.span[1] - 1:
      self.stop(step, state)

  def stop(self, step, state=None):
    if self.active:
      if state is not None:
        jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      logging.info("Wrote the profile of steps %d..%d to %s.", self.span[0], step, self.directory)


class Timed:
  """Adds the seconds a block takes to a Throughput's lost time."""

  def __init__(self, throughput):
    self.throughput = throughput

  def __enter__(self):
    self.start = time.perf_counter()

  def __exit__(self, *exc):
    self.throughput.lose(time.perf_counter() - self.start)


def run(state, step_fn, next_batch, rng, *, start, train_config, tokens_per_step, writer, mesh,
        rules, preempted, save, evaluate=None, profile_dir="", flops_scale=1.0):
  """Steps start + 1 .. train_config.steps; returns (state, last logged and evaluated metrics).

  `step_fn(state, batch, rng) -> (state, scalars)`; `next_batch()` gives the next device batch;
  `save(step, state)` checkpoints; `evaluate(step, state) -> dict` runs every eval_every steps and
  at the last step (its results join the returned metrics). The loop stops early, after saving,
  when `preempted` is reached. Every log line carries tokens/s, MFU and goodput
  (`metrics_lib.Throughput`); `train.profile_steps="START:END"` traces steps START..END-1 with
  jax.profiler into `profile_dir`. `flops_scale` multiplies XLA's FLOP count of the step, which
  counts a loop body once (gradient accumulation's micro-batches; 0: no MFU).
  """
  t = train_config
  peak, _ = flops_lib.machine_peak_flops(t.get("peak_tflops", 0.0))
  throughput = metrics_lib.Throughput(tokens_per_step, t.steps, start, peak_flops=peak)
  log = functools.partial(log_scalars, writer, throughput, t)
  profiler = Profiler(t.get("profile_steps", ""), profile_dir)
  try:
    return _steps(state, step_fn, next_batch, rng, start, t, log, throughput, profiler, mesh,
                  rules, preempted, save, evaluate, flops_scale)
  finally:
    profiler.stop(t.steps)  # Only if the loop ended inside the profiled steps.


def _steps(state, step_fn, next_batch, rng, start, t, log, throughput, profiler, mesh, rules,
           preempted, save, evaluate, flops_scale):
  """`run`'s loop (see there)."""
  final, scalars = {}, None
  pending = None  # (step, device metrics): fetched one step late so dispatch stays asynchronous
  for step in range(start + 1, t.steps + 1):
    # Input time is lost only when the device has nothing left to run while it waits.
    idle = scalars is None or all(x.is_ready() for x in jax.tree.leaves(scalars))
    waited = time.perf_counter()
    batch = next_batch()
    if idle:
      throughput.lose(time.perf_counter() - waited)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      if step == start + 1:
        throughput.flops_per_step = flops_scale * flops_lib.step_flops(step_fn, state, batch, rng)
      profiler.before(step)
      state, scalars = step_fn(state, batch, rng)
      with Timed(throughput):
        profiler.after(step, state)
    if pending is not None:
      log(*pending)
      pending = None
    if step % t.log_every == 0 or step == t.steps:
      pending = (step, scalars)
    if evaluate is not None and (step % t.eval_every == 0 or step == t.steps):
      if pending is not None:
        final.update(log(*pending))
        pending = None
      with Timed(throughput):
        final.update(evaluate(step, state))
    stop = reached_preemption(preempted, step)
    if step % t.checkpoint_every == 0 or step == t.steps or stop:
      nonfinite_lib.raise_if_stopped(state.nonfinite, t.nonfinite)
      with Timed(throughput):
        save(step, state)
    if stop:
      logging.warning("Preempted: saved step %d and stopping; rerun the command to resume.", step)
      break
  if pending is not None:
    final.update(log(*pending))
  return state, final
