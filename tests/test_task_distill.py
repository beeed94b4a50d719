"""Task distillation (pretrain.finetune.distill): the loss against closed forms, a teacher equal to
the student, the teacher's shardings, and the config checks. The end-to-end runs (a fine-tuned
teacher distilled into a student, refusals of a mismatched teacher) reuse tests/test_finetune.py's
toy task and fine-tuned run, so they live there."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs.finetune import common as ft_common, exception_type
from pretrain.finetune import distill, heads
from pretrain.models import encoder as enc
from pretrain.training import optimizer as optimizer_lib, sharding, state as state_lib


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_soft_kl_matches_a_hand_computed_value_at_two_temperatures():
  # Teacher uniform; student softmax [3/4, 1/4]: KL = 1/2 log(1/2 / 3/4) + 1/2 log(1/2 / 1/4).
  expected = 0.5 * np.log(4 / 3)
  teacher, kl = np.zeros((1, 2)), jax.jit(distill.soft_kl)
  assert float(kl(np.array([[np.log(3), 0.0]]), teacher, 1.0)[0]) == pytest.approx(expected,
                                                                                  rel=1e-6)
  # At T=2 the student's logits are halved first: 2 log 3 gives the same distribution.
  assert float(kl(np.array([[2 * np.log(3), 0.0]]), teacher, 2.0)[0]) == pytest.approx(expected,
                                                                                      rel=1e-6)


def test_distill_loss_is_alpha_ce_plus_t_squared_kl_against_numpy():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(5, 4)) * 2, rng.normal(size=(5, 4)) * 2
  labels, weights = np.array([0, 3, 1, 2, 2]), np.array([1, 1, 1, 1, 0.0])
  temperature, alpha = 2.5, 0.3
  p, q = _softmax(teacher / temperature), _softmax(student / temperature)
  kl = np.sum(p * np.log(p / q), -1)
  ce = -np.log(_softmax(student)[np.arange(5), labels])
  expected = np.sum(weights * (alpha * ce + (1 - alpha) * temperature ** 2 * kl)) / 4
  terms = jax.jit(distill.distill_terms)  # T and alpha traced: one compile for the three calls.
  loss, metrics = terms(student, teacher, labels, weights, temperature, alpha)
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  total, count = metrics["distill_kl"]
  assert float(count) == 4 and float(total) / 4 == pytest.approx(np.mean(kl[:4]), rel=1e-5)
  agree = np.mean(student[:4].argmax(-1) == teacher[:4].argmax(-1))
  assert float(metrics["teacher_agreement"][0]) / 4 == pytest.approx(agree)
  pure, _ = terms(student, teacher, labels, weights, temperature, 0.0)  # The paper's setting: no labels at all.
  assert float(pure) == pytest.approx(temperature ** 2 * np.mean(kl[:4]), rel=1e-5)
  hard, _ = terms(student, teacher, labels, weights, temperature, 1.0)
  assert float(hard) == pytest.approx(np.mean(ce[:4]), rel=1e-5)


TINY = enc.EncoderConfig(vocab_size=13, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                         max_len=8, dropout_rate=0.0)


def _batch(rng, token_labels=False):
  seg = (np.arange(8)[None] < np.array([[8], [5], [3], [6]])).astype(np.int32)
  ids = np.where(seg > 0, rng.integers(5, 13, (4, 8)), 0).astype(np.int32)
  labels = rng.integers(3, size=(4, 8) if token_labels else (4,))
  if token_labels:
    labels = np.where(seg > 0, labels, -1)
  return {"input_ids": ids, "segment_ids": seg, "positions": np.where(seg > 0, np.arange(8), 0),
          "token_types": np.zeros_like(ids), "labels": labels, "weights": np.ones(4, np.float32)}


@pytest.mark.parametrize("head", ["sequence", "token"])
def test_a_teacher_equal_to_the_student_gives_zero_kl_and_full_agreement(head):
  model = heads.make(head, TINY, num_classes=3, pooling="mean")
  batch = _batch(np.random.default_rng(1), token_labels=head == "token")
  distilled = distill.Distilled(model, model, 8, temperature=2.0, alpha=0.0)

  @jax.jit
  def run(rng):  # One compile: init, then the loss with the student as its own teacher.
    params = nn.unbox(model.init(rng, batch))
    state = {distill.TEACHER: params}
    value, (metrics, new_state) = distilled.loss(params, state, batch, jax.random.key(2),
                                                 train=False)
    return value, metrics, new_state, state, model.predict(params, batch)

  value, metrics, new_state, state, logits = run(jax.random.key(0))
  scored = np.sum(batch["labels"] >= 0)
  assert float(metrics["distill_kl"][1]) == scored  # Token head: labelled tokens only.
  assert abs(float(value)) < 1e-6 and abs(float(metrics["distill_kl"][0])) < 1e-5
  assert float(metrics["teacher_agreement"][0]) == scored
  jax.tree.map(np.testing.assert_array_equal, new_state, state)  # The teacher stays frozen.
  host = distill.agreement_metrics(logits, logits, batch["labels"], 2.0)
  assert host == {"teacher_agreement": 1.0, "distill_kl": pytest.approx(0.0, abs=1e-6)}
  other = distill.agreement_metrics(logits, -logits, batch["labels"], 2.0)
  assert other["teacher_agreement"] < 1 and other["distill_kl"] > 0


def test_the_teacher_is_sharded_by_the_students_logical_axes():
  model = heads.make("sequence", TINY, num_classes=3)
  wider = heads.make("sequence", enc.EncoderConfig(**{**TINY.__dict__, "hidden_size": 32,
                                                      "num_layers": 2}), num_classes=3)
  distilled = distill.Distilled(model, wider, 8, temperature=1.0, alpha=0.0)
  config = ft_common.base_config()
  config.mesh.update(data=2, fsdp=4, tensor=1)
  mesh = sharding.make_mesh(config.mesh)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, 10)
  _, shardings = state_lib.abstract_state(distilled, tx, 8, mesh, config.axis_rules)
  _, wider_shardings = state_lib.abstract_state(wider, tx, 8, mesh, config.axis_rules)
  specs = jax.tree.map(lambda s: s.spec, shardings.obj_state[distill.TEACHER])
  assert specs == jax.tree.map(lambda s: s.spec, wider_shardings.params)
  word = specs["encoder"]["embeddings"]["word_embeddings"]["embedding"]
  assert "fsdp" in jax.tree.leaves(tuple(word)), word  # Really split, not replicated.


def test_distillation_keys_are_validated_naming_the_key():
  config = exception_type.get_config(None)
  config.init = "exports/demo"
  config.teacher = "workdir/teacher"
  ft_common.validate(config)
  for key, value, message in (("distill_alpha", 1.5, "distill_alpha=1.5; allowed: 0 <= alpha"),
                              ("distill_temperature", 0.0, "distill_temperature=0.0; allowed: > 0")):
    bad = config.copy_and_resolve_references()
    bad[key] = value
    with pytest.raises(ValueError, match=message):
      ft_common.validate(bad)
  config.task.head = "biencoder"
  with pytest.raises(ValueError, match="teacher='workdir/teacher'; allowed: '' with task.head=bi"):
    ft_common.validate(config)
