"""AdamW with BERT's weight-decay exclusions, a warmup-then-decay schedule and global-norm clipping."""
import jax
import optax


def learning_rate_schedule(c, total_steps):
  """Linear warmup to `c.learning_rate`, then linear or cosine decay (or constant) to the end."""
  warmup = min(c.warmup_steps, total_steps)
  end = c.learning_rate * c.end_learning_rate_factor
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
  schedule = learning_rate_schedule(c, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(c.grad_clip_norm) if c.grad_clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                  mask=decay_mask))
  return tx, schedule
