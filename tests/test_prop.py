"""PROP (objectives/prop.py): the document language model, the word sets, the rows, the hinge loss."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import common, prop as prop_config
from objectives import prop, registry
from tests.conftest import fake_tokenizer, packed_batch
from tests.test_contrastive import _random_params

V = 40


def _background():
  ordinary = np.ones(V, bool)
  ordinary[:5] = False
  return prop.background_log_probs(fake_tokenizer(V), V, ordinary), ordinary


def test_the_document_model_is_dirichlet_smoothed_counts():
  background, ordinary = _background()
  np.testing.assert_allclose(np.exp(background[ordinary]), 1 / (V - 5), rtol=1e-6)
  assert np.all(np.isneginf(background[~ordinary]))
  ids = jnp.asarray([[2, 7, 7, 9, 3, 0]])
  doc = jnp.asarray([[0, 1, 1, 1, 0, 0]], bool)
  logp = np.asarray(prop.document_log_probs(ids, doc, jnp.asarray(background), 10.0))[0]
  expected = lambda tf: np.log((tf + 10.0 / (V - 5)) / (3 + 10.0))  # noqa: E731
  np.testing.assert_allclose(logp[[7, 9, 11]], [expected(2), expected(1), expected(0)], rtol=1e-5)
  np.testing.assert_allclose(np.exp(logp[ordinary]).sum(), 1.0, rtol=1e-5)


def test_word_sets_are_distinct_ordinary_ids_of_poisson_length_with_their_likelihoods():
  background, ordinary = _background()
  logp = jnp.tile(jnp.asarray(background)[None], (4000, 1))
  ids, slots, likelihood = prop.sample_sets(jax.random.key(0), logp, 3.0, 8)
  ids, slots = np.asarray(ids), np.asarray(slots)
  assert ids.shape == (2, 4000, 8) and ordinary[ids].all()
  assert all(len(set(row)) == 8 for row in ids[0][:50])  # Top-k draws: no repeats.
  lengths = slots.sum(1)
  # Poisson(3) clipped to [1, 8]: mean 3 + P(0) - (tail above 8) = 3.046.
  assert lengths.min() == 1 and lengths.max() <= 8 and abs(lengths.mean() - 3.046) < 0.1
  np.testing.assert_allclose(likelihood[0], (np.asarray(background)[ids[0]] * slots).sum(1),
                             rtol=1e-5)


def test_rows_are_cls_set_sep_document_with_the_unused_slots_masked():
  ids = jnp.asarray([[2, 11, 12, 13, 3, 14, 15, 3]])
  doc = (ids > 4)
  rows = prop.set_rows(jnp.asarray([[20, 21, 22]]), jnp.asarray([[True, True, False]]), ids, doc,
                       2, 3)
  assert rows["input_ids"].tolist() == [[2, 20, 21, 0, 3, 11, 12, 13]]
  assert rows["segment_ids"].tolist() == [[1, 1, 1, 0, 1, 1, 1, 1]]
  assert rows["positions"].tolist() == [[0, 1, 2, 0, 3, 4, 5, 6]]


def test_the_loss_is_the_pairwise_hinge_and_trains_jointly_with_mlm():
  config = common.validate(prop_config.get_config("size=tiny,vocab_size=500,seq_len=32"))
  config.model.dropout_rate = 0.0
  objective = registry.build(config, fake_tokenizer(500))
  params = _random_params(objective)
  batch = packed_batch(np.random.default_rng(0), 8, 32, 500)
  rng = jax.random.key(4)
  (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(
      lambda p: objective.loss(p, objective.init_state(), batch, rng, train=True),
      has_aux=True))(params)
  assert {"mlm/mlm_loss", "prop/prop_loss", "prop/prop_accuracy"} <= set(metrics)
  value = lambda k: float(metrics[k][0]) / float(metrics[k][1])  # noqa: E731
  np.testing.assert_allclose(float(loss), value("mlm/mlm_loss") + value("prop/prop_loss"),
                             rtol=1e-5)
  assert 0 < value("prop/prop_loss") and 0 <= value("prop/prop_accuracy") <= 1
  head = np.abs(np.asarray(grads["prop_head"]["score"]["kernel"])).sum()
  assert head > 0 and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_the_background_is_the_tokenizers_unigram_model_without_byte_pieces():
  import types  # pylint: disable=import-outside-toplevel
  piece = lambda score, kind=1: types.SimpleNamespace(score=score, type=kind)  # noqa: E731
  pieces = [piece(0.0, 3)] * 5 + [piece(-1.0), piece(-2.0), piece(0.0, 6), piece(-3.0)]
  tok = types.SimpleNamespace(model_type="unigram",
                              proto=lambda: types.SimpleNamespace(pieces=pieces))
  ordinary = np.array([False] * 5 + [True] * 4)
  logp = prop.background_log_probs(tok, 9, ordinary)
  raw = np.array([-1.0, -2.0, -3.0, -3.0])  # The byte piece (type 6) gets the rarest score.
  np.testing.assert_allclose(logp[5:], raw - np.log(np.exp(raw).sum()), rtol=1e-6)
