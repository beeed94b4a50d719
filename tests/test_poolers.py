"""Poolers: shapes, closed forms, NV-Embed's latent attention against numpy, padding invariance."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from pretrain.models import poolers

B, L, H, LAYERS = 3, 7, 16, 2
LENGTHS = (7, 4, 1)  # tokens per row; the rest is padding


def _inputs(seed=0, length=L):
  rng = np.random.default_rng(seed)
  layers = tuple(rng.standard_normal((B, length, H)).astype(np.float32) for _ in range(LAYERS + 1))
  seg = (np.arange(length)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
  return layers, seg


def _config(kind, **kwargs):
  return poolers.PoolerConfig(kind=kind, hidden_size=H, num_layers=LAYERS, num_latents=5,
                              num_heads=4, **kwargs)


def _params(config, seed=1):
  """Random params of the right shapes (biases and LayerNorms too, so no term hides at zero)."""
  shapes = nn.unbox(jax.eval_shape(functools.partial(poolers.init_params, poolers.Pooler(config)),
                                  jax.random.key(0)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


@functools.lru_cache(maxsize=None)
def _apply(config):
  return jax.jit(lambda p, layers, seg: poolers.embed(config, p, layers, seg))


@pytest.mark.parametrize("kind,projection", [("cls", 6), ("mean", 0), ("latent", 0),
                                             ("multilayer", 6)])
def test_shapes_and_padding_invariance(kind, projection):
  config = _config(kind, projection_dim=projection, projection_layer_norm=bool(projection))
  params = _params(config)
  layers, seg = _inputs()
  out = np.asarray(_apply(config)(params, layers, seg))
  assert out.shape == (B, projection or H) and np.isfinite(out).all()
  # Different junk in the padded positions must not move any embedding.
  junk, _ = _inputs(seed=5)
  padded = tuple(np.where(seg[..., None] > 0, x, j) for x, j in zip(layers, junk))
  np.testing.assert_allclose(np.asarray(_apply(config)(params, padded, seg)), out, atol=1e-5)
  # Nor may more padding: append 3 padding positions.
  longer = tuple(np.concatenate([x, j[:, :3]], 1) for x, j in zip(layers, junk))
  seg_longer = np.concatenate([seg, np.zeros((B, 3), np.int32)], 1)
  np.testing.assert_allclose(np.asarray(_apply(config)(params, longer, seg_longer)), out,
                             atol=1e-5)
  # And a real token does move it (except for cls, which only reads position 0).
  moved = tuple(x.copy() for x in layers)
  for x in moved:
    x[0, 1] += np.linspace(-1.0, 1.0, H, dtype=np.float32)  # not constant: LayerNorm removes that
  changed = np.abs(np.asarray(_apply(config)(params, moved, seg))[0] - out[0]).max()
  assert (changed < 1e-6) if kind == "cls" else (changed > 1e-4)


def test_cls_and_mean_closed_forms_and_normalisation():
  layers, seg = _inputs()
  cls = np.asarray(poolers.embed(_config("cls"), {}, layers, seg))
  np.testing.assert_allclose(cls, layers[-1][:, 0], rtol=1e-6)
  mean = np.asarray(poolers.embed(_config("mean"), {}, layers, seg))
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(mean[b], layers[-1][b, :n].mean(0), rtol=1e-5, atol=1e-6)
  unit = np.asarray(poolers.embed(_config("mean", normalize=True), {}, layers, seg))
  np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(unit, mean / np.linalg.norm(mean, axis=-1, keepdims=True), rtol=1e-5)


def _layer_norm(x, p, eps=1e-5):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _cross_attention(p, x, context, heads):
  """NV-Embed's PreNorm(Attention): q from norm(x), k/v from norm_context(context), no biases."""
  q = _layer_norm(x, p["norm"]) @ p["query"]["kernel"]
  c = _layer_norm(context, p["norm_context"])
  k, v = c @ p["key"]["kernel"], c @ p["value"]["kernel"]
  split = lambda t: t.reshape(*t.shape[:-1], heads, -1)  # noqa: E731
  q, k, v = split(q), split(k), split(v)
  s = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  out = np.einsum("bnqk,bknd->bqnd", a, v).reshape(*x.shape[:-1], -1)
  return out @ p["output"]["kernel"]


def _feed_forward(p, x):
  y = _layer_norm(x, p["norm"]) @ p["dense_in"]["kernel"] + p["dense_in"]["bias"]
  y, gate = np.split(y, 2, axis=-1)
  y = y * (0.5 * gate * (1 + erf(gate / np.sqrt(2))))
  return y @ p["dense_out"]["kernel"] + p["dense_out"]["bias"]


def test_latent_attention_matches_a_numpy_nv_embed():
  config = _config("latent")
  params = _params(config)
  layers, seg = _inputs()
  ours = np.asarray(_apply(config)(params, layers, seg))
  p = jax.tree.map(np.asarray, params)
  x = layers[-1].astype(np.float64)
  latents = np.broadcast_to(p["latents"], (B, *p["latents"].shape))
  x = x + _cross_attention(p["attention"], x, latents, config.num_heads)
  x = x + _feed_forward(p["feed_forward"], x)
  expected = np.stack([x[b, :n].mean(0) for b, n in enumerate(LENGTHS)])
  np.testing.assert_allclose(ours, expected, rtol=2e-4, atol=2e-5)


def test_multilayer_pooling_matches_numpy():
  config = _config("multilayer", projection_dim=6, normalize=True)
  params = _params(config)
  layers, seg = _inputs()
  ours = np.asarray(_apply(config)(params, layers, seg))
  p = jax.tree.map(np.asarray, params)
  summary = np.stack([np.stack([h[b, :n].mean(0) for b, n in enumerate(LENGTHS)])
                      for h in layers], 1) + p["layer_position"]
  x = np.broadcast_to(p["latents"], (B, *p["latents"].shape)).astype(np.float64)
  x = x + _cross_attention(p["attention"], x, summary, config.num_heads)
  x = x + _feed_forward(p["feed_forward"], x)
  y = x.mean(1) @ p["projection"]["kernel"] + p["projection"]["bias"]
  expected = y / np.linalg.norm(y, axis=-1, keepdims=True)
  np.testing.assert_allclose(ours, expected, rtol=2e-4, atol=2e-5)


def test_every_param_has_logical_axes():
  for kind in ("latent", "multilayer"):
    config = _config(kind, projection_dim=6, projection_layer_norm=True)
    boxed = jax.eval_shape(functools.partial(poolers.init_params, poolers.Pooler(config)),
                                  jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    leaves = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(leaves) >= 10
    for path, spec in leaves:
      assert any(name is not None for name in spec), (kind, jax.tree_util.keystr(path), spec)


def test_save_and_load_round_trip(tmp_path):
  config = _config("latent", projection_dim=6, normalize=True)
  params = _params(config)
  poolers.save(str(tmp_path), config, params)
  loaded_config, loaded = poolers.load(str(tmp_path))
  assert loaded_config == config
  layers, seg = _inputs()
  np.testing.assert_array_equal(np.asarray(_apply(config)(loaded, layers, seg)),
                                np.asarray(_apply(config)(params, layers, seg)))
  assert poolers.load(str(tmp_path / "none")) is None


def test_bad_configs_say_what_to_change():
  with pytest.raises(ValueError, match="Unknown pooler 'sum'.*cls, mean, max, latent, multilayer"):
    poolers.PoolerConfig(kind="sum")
  with pytest.raises(ValueError, match="pooler heads \\(3\\) must divide the hidden size"):
    poolers.PoolerConfig(kind="latent", hidden_size=16, num_heads=3)
  with pytest.raises(ValueError, match="needs all 3 layer outputs"):
    config = _config("multilayer")
    layers, seg = _inputs()
    poolers.Pooler(config).init(jax.random.key(0), layers[-1], jnp.asarray(seg), None)
