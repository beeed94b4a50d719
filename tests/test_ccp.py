"""CCP (contrastive context prediction): context pairs within the window, the asymmetric batch norm."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import common, contriever
from objectives import contrastive_losses as losses, registry
from pretrain.data import pairs
from tests.conftest import fake_tokenizer
from tests.test_contrastive import V, WordTokenizer, _chunks, _random_params


def test_each_centre_is_paired_with_a_unit_within_the_window():
  lines = [f"line {i} is " + "w " * (i % 3) + f"end{i}" for i in range(12)]
  text = "\n".join(lines) + "\n"
  tok = WordTokenizer()
  ids = [tuple(x) for x in tok.encode_batch(lines)]
  for window in (1, 3):
    out = pairs.Examples(tok, "ccp", 16, 16, 0.9, "line", ccp_window=window)(
        text, np.random.default_rng(0))
    assert len(out["query_ids"]) == 12
    for r, (q, d) in enumerate(zip(out["query_ids"], out["doc_ids"])):
      centre = tuple(q[1:q.tolist().index(3)])
      context = tuple(d[1:d.tolist().index(3)])
      i, j = ids.index(centre), ids.index(context)
      assert i == r and 0 < abs(i - j) <= window


def test_batch_standardize_gives_zero_mean_unit_variance_over_valid_rows():
  x = np.random.default_rng(0).standard_normal((6, 1, 4)) * 3 + 2
  valid = np.array([1, 1, 1, 1, 1, 0], bool)
  y = np.asarray(losses.batch_standardize(jnp.asarray(x), jnp.asarray(valid)))
  np.testing.assert_allclose(y[valid].mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(y[valid].var(0), 1, atol=1e-3)
  np.testing.assert_allclose(y[:5], (x[:5] - x[:5].mean(0)) / np.sqrt(x[:5].var(0) + 1e-5),
                             rtol=1e-5, atol=1e-6)


def test_the_ccp_recipe_is_moco_with_the_query_side_normalised():
  c = contriever.get_config("view=ccp,loss=moco,size=tiny,vocab_size=500,batch_size=8,"
                            "seq_len=32,queue_size=16")
  c.model.dropout_rate = 0.0
  c = common.validate(c)
  assert c.objective.query_batch_norm and c.objective.contrastive_loss == "moco"
  objective = registry.build(c, fake_tokenizer(V))
  params = _random_params(objective)
  q, d = _chunks(1), _chunks(2)
  batch = {**{f"query_{k}": v for k, v in zip(("ids", "segment_ids", "positions"), q.values())},
           **{f"doc_{k}": v for k, v in zip(("ids", "segment_ids", "positions"), d.values())}}
  state = nn.unbox(objective.init_state())
  loss, (metrics, new_state) = jax.jit(
      lambda p, s: objective.loss(p, s, batch, jax.random.key(0), train=True))(params, state)
  assert np.isfinite(float(loss)) and int(new_state["queue_ptr"]) == 8
