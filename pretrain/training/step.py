"""The pure train and eval steps, jitted at the call site; `model.loss` is the only model code.

Metrics are `(total, count)` pairs (objectives.base.mean_metric) so that they average exactly
across micro-batches, devices and evaluation batches.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from pretrain.training import nonfinite as nonfinite_lib


def metric_values(metrics):
  """Reduces `(total, count)` pairs to their averages (0 where nothing was counted)."""
  return {k: t / jnp.maximum(c, 1e-9) for k, (t, c) in metrics.items()}


def split_micro(batch, n):
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
    micro_batches = split_micro(batch, accum_steps)
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
  scalars = metric_values(metrics)
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
  return {f"eval_{k}": float(v) for k, v in jax.device_get(metric_values(totals)).items()}
