"""Task distillation (Well-Read Students, Turc et al. 2019): a student learns a fine-tuned teacher's
soft predictions on the task's rows.

  loss = alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

where `_T` is softmax(logits / T). The T^2 factor (Hinton et al. 2015) keeps the soft term's
gradients the same size as T changes; alpha = 0 is the paper's pure distillation. A sequence head
distils one distribution per row, a token head one per labelled token (labels -1 are neither
scored nor distilled: padding and continuation pieces carry no prediction).

`Distilled` wraps the student's task model (`pretrain.finetune.heads`) so that the shared train step
runs it unchanged: the teacher's parameters are its non-gradient state (`init_state`), boxed with
the teacher model's own logical axes, so they are sharded by the same rules as the student's and
checkpointed with the run; the teacher predicts inside the jitted step, without dropout and without
gradients. Parameters and `predict` are the student's: a distilled workdir is a fine-tuned one.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from objectives import base

TEACHER = "teacher"  # obj_state key of the teacher's parameters


def soft_kl(student_NC, teacher_NC, temperature):
  """[N] KL(softmax(teacher / T) || softmax(student / T)) per distribution, in nats, float32."""
  t = jnp.float32(temperature)
  log_p_NC = jax.nn.log_softmax(teacher_NC.astype(jnp.float32) / t, axis=-1)
  log_q_NC = jax.nn.log_softmax(student_NC.astype(jnp.float32) / t, axis=-1)
  return jnp.sum(jnp.exp(log_p_NC) * (log_p_NC - log_q_NC), axis=-1)


def distill_terms(student_NC, teacher_NC, labels_N, weights_N, temperature, alpha):
  """(loss, per-item metrics) of N distributions; weights 0 drop an item from every term.

  Per-item values: the mixed loss, the hard cross-entropy, the KL at T (without T^2), whether the
  student's argmax is the label, and whether it is the teacher's.
  """
  weights_N = weights_N.astype(jnp.float32)
  safe_N = jnp.maximum(labels_N, 0)
  ce_N = optax.softmax_cross_entropy_with_integer_labels(student_NC.astype(jnp.float32), safe_N)
  kl_N = soft_kl(student_NC, teacher_NC, temperature)
  mixed_N = alpha * ce_N + (1.0 - alpha) * temperature ** 2 * kl_N
  loss = jnp.sum(mixed_N * weights_N) / jnp.maximum(jnp.sum(weights_N), 1.0)
  pred_N = jnp.argmax(student_NC, -1)
  values = {"loss": mixed_N, "hard_loss": ce_N, "distill_kl": kl_N,
            "accuracy": pred_N == safe_N, "teacher_agreement": pred_N == jnp.argmax(teacher_NC, -1)}
  return loss, {k: base.mean_metric(v, weights_N) for k, v in values.items()}


def flat_items(logits, labels, weights):
  """(logits [N, C], labels [N], weights [N]) of a sequence ([B, C], labels [B]) or token
  ([B, L, C], labels [B, L] with -1 unscored) batch."""
  if logits.ndim == 2:
    return logits, labels, weights
  weights_BL = (labels >= 0) * weights[:, None]
  c = logits.shape[-1]
  return logits.reshape(-1, c), labels.reshape(-1), weights_BL.reshape(-1)


class Distilled:
  """The student's task model trained on a frozen teacher's soft predictions (module docstring)."""

  def __init__(self, student, teacher, seq_len, *, temperature, alpha):
    """`student`, `teacher`: task models of one head and class count over one tokenizer."""
    self.student, self.teacher = student, teacher
    self.temperature, self.alpha = float(temperature), float(alpha)
    self.features, self.model_config = student.features, student.model_config
    # The teacher's parameter shapes in their logical-axis boxes (no values computed).
    self.teacher_shapes = jax.eval_shape(teacher.init, jax.random.key(0),
                                         teacher.example_batch(seq_len))

  def init(self, rng, batch):
    return self.student.init(rng, batch)

  def init_state(self):
    """Zeros in the teacher's boxes: the sharded init places them, then the entry point puts the
    real teacher there (`with_teacher`); a resume restores it from the checkpoint."""
    return {TEACHER: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), self.teacher_shapes)}

  def example_batch(self, seq_len):
    return self.student.example_batch(seq_len)

  def encoder(self, params):
    return self.student.encoder(params)

  def predict(self, params, batch, rng=None, train=False):
    return self.student.predict(params, batch, rng, train)

  def loss(self, params, state, batch, rng, *, train):
    student = self.student.predict(params, batch, rng, train)
    teacher = jax.lax.stop_gradient(self.teacher.predict(state[TEACHER], batch, train=False))
    student_NC, labels_N, weights_N = flat_items(student, batch["labels"], batch["weights"])
    loss, metrics = distill_terms(student_NC, teacher.reshape(student_NC.shape), labels_N,
                                  weights_N, self.temperature, self.alpha)
    return loss, (metrics, state)


def with_teacher(state, teacher_params, shardings):
  """A freshly initialised train state with the teacher's arrays in place of init_state's zeros,
  on the teacher's shardings (`shardings`: the train state's)."""
  teacher = jax.device_put(jax.tree.map(np.asarray, teacher_params), shardings.obj_state[TEACHER])
  return state.replace(obj_state={**state.obj_state, TEACHER: teacher})


def agreement_metrics(student, teacher, labels, temperature):
  """Host-side scores of a whole split's logits ([N, C] or [N, L, C]; labels -1 unscored):
  the share of items where the student's argmax is the teacher's, and the mean KL at T."""
  student, teacher, labels = (np.asarray(x, np.float64) for x in (student, teacher, labels))
  scored = labels >= 0
  s_NC, t_NC = student[scored], teacher[scored]

  def log_softmax(x_NC):
    x_NC = x_NC / temperature
    x_NC = x_NC - x_NC.max(-1, keepdims=True)
    return x_NC - np.log(np.exp(x_NC).sum(-1, keepdims=True))

  log_p_NC, log_q_NC = log_softmax(t_NC), log_softmax(s_NC)
  kl_N = np.sum(np.exp(log_p_NC) * (log_p_NC - log_q_NC), -1)
  return {"teacher_agreement": float(np.mean(s_NC.argmax(-1) == t_NC.argmax(-1))),
          "distill_kl": float(np.mean(kl_N))}
