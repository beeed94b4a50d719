"""The non-finite guard: no update computed from a NaN or inf ever reaches the parameters.

Why on device, every step: checking only the metrics fetched at log steps lets a NaN between two log
steps poison the parameters, and every later step trains on silently. Inside the jitted step,
`guard` turns the step's loss, gradient norm and update norm into one `apply` flag; the update is
kept only where it holds (`select`, no host sync), and `NonFinite` (part of the train state, so
also checkpointed) records what happened. The host reads it with the metrics it fetches anyway
and before each save, and then, per `config.train.nonfinite`:
  "stop": the first non-finite step freezes the state (no later update is applied either) and the
          run raises FloatingPointError naming that step and the metrics, before any checkpoint of
          the frozen state is written; the last good checkpoint stays the newest;
  "skip": that step's update is dropped (parameters, optimizer and objective state stay as they
          were; the step counter and the data move on), counted in `skipped_steps` and logged.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

CHECKS = ("loss", "grad_norm", "update_norm")
_KEYS = ("nonfinite_first_step", "nonfinite_first_bits", "nonfinite_last_step", "skipped_steps")


@flax.struct.dataclass
class NonFinite:
  first_step: jax.Array  # int32: the first step (as logged, 1-based) that was not finite; -1: none
  first_bits: jax.Array  # int32: bit i set when CHECKS[i] was not finite at first_step
  last_step: jax.Array   # int32: the latest such step; -1: none
  skipped: jax.Array     # int32: steps whose update was not applied


def init():
  minus_one = jnp.full((), -1, jnp.int32)
  return NonFinite(first_step=minus_one, first_bits=jnp.zeros((), jnp.int32), last_step=minus_one,
                   skipped=jnp.zeros((), jnp.int32))


def guard(state, step, mode, values):
  """(apply, new state) for the step that `step` (0-based, before the update) is computing.

  `values` maps each name of CHECKS to a scalar; in "stop" mode nothing is applied after the first
  non-finite step.
  """
  bits = sum(jnp.where(jnp.isfinite(values[name]), 0, 1 << i) for i, name in enumerate(CHECKS))
  finite = bits == 0
  apply = finite & (state.first_step < 0) if mode == "stop" else finite
  first = (state.first_step < 0) & ~finite
  logged_step = (step + 1).astype(jnp.int32)
  return apply, NonFinite(
      first_step=jnp.where(first, logged_step, state.first_step),
      first_bits=jnp.where(first, bits, state.first_bits).astype(jnp.int32),
      last_step=jnp.where(finite, state.last_step, logged_step),
      skipped=state.skipped + (~apply).astype(jnp.int32))


def select(apply, new, old):
  """`new` where the update applies, else `old`, leaf by leaf (fuses into the update on device)."""
  return jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)


def scalars(state):
  """What the step reports next to its metrics; `check` takes these keys out again on the host."""
  return dict(zip(_KEYS, (state.first_step, state.first_bits, state.last_step, state.skipped)))


def names(bits):
  return ", ".join(name for i, name in enumerate(CHECKS) if int(bits) >> i & 1)


def _error(step, bits):
  return FloatingPointError(
      f"Non-finite {names(bits)} at step {step}: its update was not applied and the run stopped "
      f"(train.nonfinite='stop'); no checkpoint of step {step} or later was written. Lower "
      f"optimizer.learning_rate, check the data, or set --config.train.nonfinite=skip to drop such "
      f"updates and train on.")


def check(step, fetched, mode, log_every):
  """Host side, with the metrics of a log step: raises ("stop") or warns ("skip").

  Returns the metrics to write: the bookkeeping keys removed, `skipped_steps` kept in "skip" mode.
  """
  fetched = dict(fetched)
  first, bits, last, skipped = (int(fetched.pop(k)) for k in _KEYS)
  if mode == "stop":
    if first >= 0:
      raise _error(first, bits)
    return fetched
  if last > step - log_every:
    logging.warning("Skipped the non-finite update of step %d (%d skipped so far; the first, at "
                    "step %d: %s); train.nonfinite='skip'.", last, skipped, first, names(bits))
  return {**fetched, "skipped_steps": skipped}


def raise_if_stopped(state, mode):
  """Host side, before a checkpoint: a frozen ("stop") state is never saved."""
  if mode == "stop":
    first, bits = (int(np.asarray(jax.device_get(x))) for x in (state.first_step, state.first_bits))
    if first >= 0:
      raise _error(first, bits)
