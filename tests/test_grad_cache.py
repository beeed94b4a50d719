"""GradCache (objectives/grad_cache.py): chunked embeddings give the plain loss and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from objectives import grad_cache, registry
from objectives.checks import ConfigError
from pretrain.interop import load
from pretrain.training import sharding
from tests.conftest import fake_tokenizer
from tests.test_contrastive import V, _chunks, _config, _loss_and_grads, _pair_batch, _random_params
from tests.test_contrastive import hf_dir  # noqa: F401  # pylint: disable=unused-import

ONE = {"data": 1, "fsdp": 1, "tensor": 1}
EIGHT = {"data": 8, "fsdp": 1, "tensor": 1}


def test_chunks_are_strided_and_merge_restores_the_row_order():
  x = jnp.arange(12 * 2).reshape(12, 2)
  chunks = grad_cache.split(x, 3)
  assert chunks.shape == (3, 4, 2)
  np.testing.assert_array_equal(chunks[1][:, 0], x[1::3, 0])  # Chunk k: rows k, k + 3, ...
  np.testing.assert_array_equal(grad_cache.merge(chunks), x)
  calls = []

  def fn(rows, rng):
    calls.append(rows["x"].shape)
    return rows["x"] * 2.0 + jax.random.uniform(rng, ())

  out = grad_cache.chunked(fn, {"x": x}, jax.random.key(0), 4)
  assert calls == [(4, 2)] and out.shape == x.shape  # One traced body, mapped over 3 chunks.
  with pytest.raises(ValueError, match="does not divide the batch of 12"):
    grad_cache.chunked(fn, {"x": x}, jax.random.key(0), 5)


def _double(batch):
  """16 rows: two batches of the crop view's rows (so chunks of 8 split over 8 devices)."""
  other = _chunks(9)
  return {k: np.concatenate([v, other[k]]) for k, v in batch.items()}


def _compare(config, batch, mesh_axes, chunk, state=None, resources=None):
  plain = registry.build(config, fake_tokenizer(V), resources or load.resources(config, None))
  config.objective.grad_cache_chunk = chunk
  cached = registry.build(config, fake_tokenizer(V), resources or load.resources(config, None))
  params = _random_params(plain)
  state = state if state is not None else {}
  devices = jax.devices()[:int(np.prod(list(mesh_axes.values())))]
  mesh = sharding.make_mesh(mesh_axes, devices)
  traced = str(jax.make_jaxpr(lambda p: cached.loss(p, state, batch, jax.random.key(7),
                                                    train=True))(params))
  assert "remat" in traced and "scan" in traced  # The cached run does encode in chunks.
  loss0, m0, _, g0 = _loss_and_grads(plain, params, state, batch, mesh)
  loss1, m1, _, g1 = _loss_and_grads(cached, params, state, batch, mesh)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale),
               g1, g0)
  assert loss0 > 0.1 and scale > 0
  return m0, m1


def test_gradients_equal_the_plain_loss_with_cross_device_negatives():
  config = _config("symmetric=True,normalize=True,batch_size=16")
  _compare(config, _double(_chunks(0)), EIGHT, chunk=8)  # (1 device: the 2DMSE test below.)


def test_gradients_equal_with_matryoshka_and_2dmse():
  _compare(_config("nesting=matryoshka,normalize=True,batch_size=16"), _double(_chunks(3)),
           EIGHT, chunk=8)
  config = _config("nesting=2dmse,normalize=True,batch_size=16", view="docstring",
                   matryoshka_dims=(8, 16, 64))
  config.model.num_layers = 3
  pairs = [_pair_batch(4), _pair_batch(6)]
  _compare(config, {k: np.concatenate([p[k] for p in pairs]) for k in pairs[0]}, ONE, chunk=4)


def test_gradients_equal_with_the_guide_masking_and_teaching_candidates(hf_dir):  # noqa: F811
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  path, _ = hf_dir
  # The guide masks and, through KL score distillation, teaches (cross-device candidates).
  config = _config("normalize=True,batch_size=16", guide=str(path), score_distill="kl",
                   score_distill_temperature=0.1)
  resources = load.resources(config, None)
  state = nn.unbox(registry.build(config, fake_tokenizer(V), resources).init_state())
  m0, m1 = _compare(config, _double(_chunks(4)), EIGHT, chunk=8, state=state,
                    resources=resources)
  np.testing.assert_allclose(np.asarray(m1["guide_masked_fraction"]),
                             np.asarray(m0["guide_masked_fraction"]))
  assert float(m0["guide_masked_fraction"][0]) > 0
  np.testing.assert_allclose(np.asarray(m1["score_distill_loss"]),
                             np.asarray(m0["score_distill_loss"]), rtol=1e-6)
  assert float(m0["score_distill_loss"][0]) > 1e-3


def test_a_chunk_that_does_not_divide_the_batch_is_a_config_error():
  with pytest.raises(ConfigError, match="objective.grad_cache_chunk"):
    _config("", grad_cache_chunk=3)


def test_gradients_equal_with_hard_negatives_on_8_devices():
  from tests.test_pair_files import _files_config, _negative_batch  # pylint: disable=import-outside-toplevel
  config = _files_config(2)
  config.data.batch_size = 16
  _compare(config, _negative_batch(5, b=16), EIGHT, chunk=8)
