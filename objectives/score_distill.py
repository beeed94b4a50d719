"""Score distillation for embeddings: a frozen teacher's similarity scores as soft targets.

The teacher is the contrastive objective's frozen guide (`objective.guide`, GISTEmbed's model,
already in the objective's state; `objective.guide_masking=False` keeps it as a teacher only, its
false-negative masking off). Teacher and student score the same candidates of the global batch:
the B positives, then the B x k hard negatives (row b * k + j: query b's j-th), every device's.

- `kl` (RocketQAv2's listwise distillation; sentence-transformers' DistillKLDivLoss, here over
  every in-batch candidate instead of a row's own): per valid query,
  KL(softmax(teacher / T_t) || softmax(student / T_s)) over the valid candidates, mean over the
  valid queries. T_s is `objective.temperature` (the InfoNCE logits' own), T_t
  `objective.score_distill_temperature` (0: T_s). DistillKLDivLoss multiplies by T_s^2, which
  restores the gradient scale of a loss used alone; here the KL is added to an InfoNCE at the
  same T_s, so it is not scaled (`objective.score_distill_weight` sets the balance).
- `margin_mse` (Hofstätter et al. 2020; sentence-transformers' MarginMSELoss): for each query b
  and each of its k hard negatives j, the student's margin s(q_b, p_b) - s(q_b, n_bj) against
  the teacher's, squared, mean over the valid (query, negative) pairs. Scores are the raw
  similarities (the student's dot product, which is cosine when `objective.normalize`, and the
  guide's cosine), without a temperature, as there.

The teacher's scores carry no gradient. The student's embeddings are those the InfoNCE scores
(the last layer, full dimension), so the loss is a function of the embeddings and composes with
GradCache (objectives/grad_cache.py) and cross-device candidates.
"""
import jax
import jax.numpy as jnp

from objectives.contrastive_losses import NEG, kl_rows

MODES = ("none", "kl", "margin_mse")


def candidate_scores(q_BD, c_CD, valid_B, valid_C, temperature):
  """[B, C]: q . c / temperature; a pair with an invalid (padding) row or candidate scores NEG,
  so it is out of every softmax (teacher and student alike)."""
  s_BC = jnp.einsum("bd,cd->bc", q_BD.astype(jnp.float32), c_CD.astype(jnp.float32))
  return jnp.where(valid_B[:, None] & valid_C[None, :], s_BC / temperature, NEG)


def kl_loss(teacher, student, valid_B, valid_C, teacher_temperature, student_temperature):
  """Mean over valid queries of KL(teacher's || student's) candidate distribution; `teacher`
  and `student` are (queries [B, D], candidates [C, D])."""
  t_BC = jax.lax.stop_gradient(candidate_scores(*teacher, valid_B, valid_C, teacher_temperature))
  s_BC = candidate_scores(*student, valid_B, valid_C, student_temperature)
  return kl_rows(t_BC, s_BC, valid_B)


def margins(q_BD, d_BD, n_BKD):
  """[B, K]: s(q_b, p_b) - s(q_b, n_bj), dot products in float32."""
  q_BD = q_BD.astype(jnp.float32)
  positive_B = jnp.sum(q_BD * d_BD.astype(jnp.float32), -1)
  return positive_B[:, None] - jnp.einsum("bd,bkd->bk", q_BD, n_BKD.astype(jnp.float32))


def margin_mse(teacher, student, valid_BK):
  """Mean over valid (query, negative) pairs of (student margin - teacher margin)^2; `teacher`
  and `student` are (queries [B, D], positives [B, D], negatives [B, K, D])."""
  diff_BK = margins(*student) - jax.lax.stop_gradient(margins(*teacher))
  weights = valid_BK.astype(jnp.float32)
  return jnp.sum(jnp.square(diff_BK) * weights) / jnp.maximum(weights.sum(), 1.0)


def loss(mode, teacher, student, valid_B, valid_C, *, num_negatives, teacher_temperature,
         student_temperature):
  """The `mode` distillation loss; `teacher`, `student`: (queries [B, D], candidates [C, D]) with
  the candidates laid out as the contrastive objective's (B positives, then B x k negatives)."""
  if mode == "kl":
    return kl_loss(teacher, student, valid_B, valid_C, teacher_temperature, student_temperature)
  if mode != "margin_mse":
    raise ValueError(f"objective.score_distill={mode!r}; choose from {', '.join(MODES)}.")
  b, k = len(valid_B), num_negatives

  def triplets(side):
    q_BD, c_CD = side
    return q_BD, c_CD[:b], c_CD[b:].reshape(b, k, c_CD.shape[-1])
  valid_BK = valid_B[:, None] & valid_C[b:].reshape(b, k)
  return margin_mse(triplets(teacher), triplets(student), valid_BK)
