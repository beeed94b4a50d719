"""AdamW with BERT's weight-decay exclusions, a learning-rate schedule and global-norm clipping.

Every schedule is a pure function of the optimizer step (`state.step`, the count of updates
applied before this one), so a resumed run gets exactly the learning rates it would have had.
"""
import jax
import jax.numpy as jnp
import optax

# optimizer.decay_shape: how `wsd` falls over its decay phase, t in [0, 1] the fraction elapsed.
DECAY_SHAPES = {
    "linear": lambda t: t,
    "1-sqrt": jnp.sqrt,  # Hägele et al. 2024; ModernBERT's decay
}


def wsd_decay_steps(decay_fraction, total_steps):
  """The length of `wsd`'s decay phase: decay_fraction x total_steps, rounded, at least 1."""
  return max(1, round(decay_fraction * total_steps))


def _require(ok, key, value, allowed):
  # objectives.checks.require's message; a ValueError, as this floor does not import objectives.
  if not ok:
    raise ValueError(f"Bad config value {key}={value!r}; allowed: {allowed}.")


def check(c, total_steps):
  """Refuses `wsd` keys that cannot make a schedule, as configs.common.validate does (with a
  ConfigError), for callers that validate otherwise (fine-tuning). Other schedules never read
  them: a config saved before they existed still builds its optimizer."""
  if c.schedule != "wsd":
    return
  _require(c.decay_shape in DECAY_SHAPES, "optimizer.decay_shape", c.decay_shape,
           ", ".join(DECAY_SHAPES))
  _require(0 < c.decay_fraction <= 1, "optimizer.decay_fraction", c.decay_fraction, "0 < f <= 1")
  if total_steps > 0:
    decay = wsd_decay_steps(c.decay_fraction, total_steps)
    _require(c.warmup_steps + decay <= total_steps, "optimizer.decay_fraction", c.decay_fraction,
             f"0 < f <= 1 with optimizer.warmup_steps + round(f x train.steps) <= train.steps "
             f"({c.warmup_steps} + {decay} > {total_steps} here)")


def wsd_schedule(peak, total_steps, warmup_steps, decay_steps, end_factor, shape):
  """Warmup-stable-decay: 0 -> peak linearly over `warmup_steps`, peak until the last
  `decay_steps`, then peak -> end_factor x peak over them, lr = end + (peak - end) x (1 - f(t))
  with t the fraction of the decay elapsed and f = DECAY_SHAPES[shape]; end is reached at
  step `total_steps`."""
  end = peak * end_factor
  fall = DECAY_SHAPES[shape]

  def decay(step):
    t = jnp.clip(jnp.asarray(step, jnp.float32) / decay_steps, 0.0, 1.0)
    return end + (peak - end) * (1.0 - fall(t))

  schedules, boundaries = [optax.constant_schedule(peak), decay], [total_steps - decay_steps]
  if warmup_steps > 0:
    schedules.insert(0, optax.linear_schedule(0.0, peak, warmup_steps))
    boundaries.insert(0, warmup_steps)
  return optax.join_schedules(schedules, boundaries)


def learning_rate_schedule(c, total_steps):
  """Linear warmup to `c.learning_rate`, then linear or cosine decay (or constant) to the end, or
  `wsd`: warmup, constant, and a decay over the last `c.decay_fraction` of the steps."""
  warmup = min(c.warmup_steps, total_steps)
  end = c.learning_rate * c.end_learning_rate_factor
  if c.schedule == "wsd":
    decay_steps = min(wsd_decay_steps(c.decay_fraction, total_steps), max(total_steps - warmup, 1))
    return wsd_schedule(c.learning_rate, max(total_steps, warmup + decay_steps), warmup,
                        decay_steps, c.end_learning_rate_factor, c.decay_shape)
  decay_steps = max(total_steps - warmup, 1)
  if c.schedule == "linear":
    decay = optax.linear_schedule(c.learning_rate, end, decay_steps)
  elif c.schedule == "cosine":
    decay = optax.cosine_decay_schedule(c.learning_rate, decay_steps, alpha=c.end_learning_rate_factor)
  else:
    decay = optax.constant_schedule(c.learning_rate)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, warmup), decay], [warmup])


def decay_mask(params):
  """True where weight decay applies: kernels and embeddings, not biases or LayerNorm parameters."""
  def decays(path, _):
    names = [str(getattr(k, "key", k)) for k in path]
    return names[-1] not in ("bias", "scale") and not any("LayerNorm" in n for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(c, total_steps):
  """The optax transformation and its schedule (the schedule is also logged)."""
  check(c, total_steps)
  schedule = learning_rate_schedule(c, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(c.grad_clip_norm) if c.grad_clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                  mask=decay_mask))
  return tx, schedule
