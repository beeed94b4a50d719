"""The contrastive objective's losses and scores as pure functions of arrays.

`info_nce` (in-batch softmax), `moco_logits` / `enqueue` / `ema` (MoCo's queue and key encoder),
`kl_rows` and `nest` (2D Matryoshka / Starbucks nesting), `guide_masks` (GISTEmbed), and the
default nesting schedules; `objectives.contrastive` combines them (see its module docstring).
"""
import jax
import jax.numpy as jnp

from objectives import base
from pretrain.models import poolers

NEG = -1e9  # score of a masked candidate: exp underflows to 0 without producing NaNs


def default_dims(dim):
  """8, 16, 32, ... below `dim`, then `dim` (Matryoshka's nesting)."""
  out, d = [], 8
  while d < dim:
    out.append(d)
    d *= 2
  return tuple(out) + (dim,)


def default_starbucks(num_layers, dim):
  """The diagonal (1, dim / 2^(n-1)), ..., (n, dim); dims never below 8 (Starbucks' schedule)."""
  return tuple((l, max(min(8, dim), dim >> (num_layers - l))) for l in range(1, num_layers + 1))


def info_nce(q_BD, d_CD, valid_B, temperature, masked_BC=None, valid_C=None):
  """Mean CE of softmax over in-batch candidates (label: the diagonal), and the [B, C] logits.

  Candidates are the B positives, then any further rows (hard negatives: C = B + B k), with
  `valid_C` (default `valid_B`). Rows and columns of invalid (padding) rows are left out;
  `masked_BC` removes candidates.
  """
  logits = jnp.einsum("bd,cd->bc", q_BD.astype(jnp.float32), d_CD.astype(jnp.float32))
  logits = logits / temperature
  b, c = logits.shape
  keep = valid_B[:, None] & (valid_B if valid_C is None else valid_C)[None, :]
  if masked_BC is not None:
    keep &= ~masked_BC
  keep |= jnp.eye(b, c, dtype=bool)  # the positive is always a candidate
  logits = jnp.where(keep, logits, NEG)
  ce = jax.nn.logsumexp(logits, -1) - jnp.diagonal(logits)
  correct = jnp.argmax(logits, -1) == jnp.arange(len(valid_B))
  weights = valid_B.astype(jnp.float32)
  loss = jnp.sum(ce * weights) / jnp.maximum(weights.sum(), 1.0)
  return loss, logits, base.mean_metric(correct, weights)


def moco_logits(q_BD, k_BD, queue_QD, temperature):
  """[B, 1 + Q]: the positive key first, then every queued key (Contriever's _compute_logits)."""
  q = q_BD.astype(jnp.float32)
  positive = jnp.sum(q * k_BD.astype(jnp.float32), -1, keepdims=True)
  return jnp.concatenate([positive, q @ queue_QD.astype(jnp.float32).T], -1) / temperature


def enqueue(queue_QD, ptr, keys_BD):
  """Writes the batch's keys at the pointer (queue size divisible by B); returns (queue, ptr)."""
  q, b = queue_QD.shape[0], keys_BD.shape[0]
  if q % b:
    raise ValueError(f"objective.queue_size={q} is not a multiple of the batch of {b} keys; "
                     f"choose a multiple of data.batch_size.")
  queue = jax.lax.dynamic_update_slice(queue_QD, keys_BD.astype(queue_QD.dtype), (ptr, 0))
  return queue, (ptr + b) % q


def ema(key_params, params, momentum, initialized):
  """key <- m key + (1 - m) params; a plain copy before the first update."""
  return jax.tree.map(lambda k, p: jnp.where(initialized, momentum * k + (1 - momentum) * p, p),
                      key_params, params)


def kl_rows(teacher_logits_BC, student_logits_BC, valid_B):
  """Mean over valid rows of KL(softmax(teacher) || softmax(student)) (torch's kl_div batchmean)."""
  log_t = jax.nn.log_softmax(teacher_logits_BC, -1)
  log_s = jax.nn.log_softmax(student_logits_BC, -1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1)
  weights = valid_B.astype(jnp.float32)
  return jnp.sum(kl * weights) / jnp.maximum(weights.sum(), 1.0)


def nest(x_BD, dim, normalize):
  """The first `dim` components (the others zeroed, so `dim` may be traced), renormalised."""
  x = jnp.where(jnp.arange(x_BD.shape[-1]) < dim, x_BD, 0.0)
  return poolers.l2_normalize(x) if normalize else x


def guide_masks(gq_BD, gd_CD):
  """GISTEmbed: the query->doc [B, C] and doc->query [B, B] masks of candidates the guide scores
  strictly above the row's own positive (cosine of the guide's embeddings). The candidates are
  the B positives, then any hard negatives (which the doc->query direction does not score)."""
  sim_BC = gq_BD @ gd_CD.T
  positive_B = jnp.diagonal(sim_BC)
  return sim_BC > positive_B[:, None], sim_BC[:, :len(positive_B)].T > positive_B[:, None]


def batch_standardize(x_BKD, valid_B, eps=1e-5):
  """Batch normalisation without affine parameters or running statistics: each dimension
  standardised by its mean and variance over the valid rows of the (global) batch. CCP applies
  it to one side only, against collapse through information leaking between the two sides."""
  w = valid_B.astype(jnp.float32)[:, None, None]
  count = jnp.maximum(w.sum(), 1.0)
  mean = jnp.sum(x_BKD * w, 0) / count
  var = jnp.sum(jnp.square(x_BKD - mean) * w, 0) / count
  return (x_BKD - mean) * jax.lax.rsqrt(var + eps)
