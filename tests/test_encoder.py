"""Fast checks of the packed-sequence encoder: masking, shapes, dtypes, sharding names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from pretrain.models.encoder import (Encoder, EncoderConfig, MlmHead, add_vocab_bias,
                                     gather_positions, word_embedding_table)

CFG = EncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                    max_len=16)
SEGMENTS = np.array([[1, 1, 1, 2, 2, 0, 0]])
POSITIONS = np.array([[0, 1, 2, 0, 1, 0, 1]])
IDS = np.array([[5, 6, 7, 8, 9, 0, 0]])


def _init(cfg=CFG, ids=IDS, seg=SEGMENTS, pos=POSITIONS):
  return Encoder(cfg).init(jax.random.key(0), ids, seg, pos)


def test_output_depends_exactly_on_own_segment():
  enc = Encoder(CFG)
  variables = _init()
  embeds_LH = word_embedding_table(variables["params"])[IDS[0]]

  def f(e_LH):
    return enc.apply(variables, None, SEGMENTS, POSITIONS, input_embeds_BLH=e_LH[None])[0]

  jac_LHLH = jax.jacfwd(f)(embeds_LH)
  # dep[i, j]: size of d out_i / d in_j.
  dep_LL = np.asarray(jnp.abs(jac_LHLH).max(axis=(1, 3)))
  seg = SEGMENTS[0]
  for i in range(len(seg)):
    for j in range(len(seg)):
      if seg[i] == seg[j]:
        assert dep_LL[i, j] > 1e-6, (i, j, dep_LL[i, j])
      else:
        assert dep_LL[i, j] == 0.0, (i, j, dep_LL[i, j])


def test_input_embeds_matches_ids():
  enc, variables = Encoder(CFG), _init()
  embeds = word_embedding_table(variables["params"])[IDS]
  a = enc.apply(variables, IDS, SEGMENTS, POSITIONS)
  b = enc.apply(variables, None, SEGMENTS, POSITIONS, input_embeds_BLH=embeds)
  np.testing.assert_array_equal(a, b)


def test_padding_content_does_not_change_real_tokens():
  enc, variables = Encoder(CFG), _init()
  other_ids = IDS.copy()
  other_ids[0, 5:] = [11, 12]
  a = enc.apply(variables, IDS, SEGMENTS, POSITIONS)
  b = enc.apply(variables, other_ids, SEGMENTS, POSITIONS)
  np.testing.assert_array_equal(a[:, :5], b[:, :5])
  assert np.all(np.isfinite(a))


def test_shapes_and_all_layers():
  enc = Encoder(CFG)
  ids = np.tile(IDS, (3, 1))
  seg, pos = np.tile(SEGMENTS, (3, 1)), np.tile(POSITIONS, (3, 1))
  variables = _init(ids=ids, seg=seg, pos=pos)
  out = enc.apply(variables, ids, seg, pos)
  assert out.shape == (3, 7, 32) and out.dtype == jnp.float32
  layers = enc.apply(variables, ids, seg, pos, return_all_layers=True)
  assert len(layers) == CFG.num_layers + 1
  np.testing.assert_array_equal(layers[-1], out)

  head = MlmHead(CFG)
  masked_BM = np.array([[0, 3], [1, 4], [2, 2]])
  hidden_BMH = gather_positions(out, masked_BM)
  assert hidden_BMH.shape == (3, 2, 32)
  np.testing.assert_array_equal(hidden_BMH[1, 1], out[1, 4])
  table = word_embedding_table(variables["params"])
  head_vars = head.init(jax.random.key(1), hidden_BMH, table)
  logits = head.apply(head_vars, hidden_BMH, table)
  assert logits.shape == (3, 2, CFG.vocab_size) and logits.dtype == jnp.float32


def test_dropout_needs_rng_and_changes_output():
  enc, variables = Encoder(CFG), _init()
  a = enc.apply(variables, IDS, SEGMENTS, POSITIONS)
  b = enc.apply(variables, IDS, SEGMENTS, POSITIONS, deterministic=False,
                rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(a, b)


def test_bfloat16_path():
  cfg = EncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                      max_len=16, dtype="bfloat16")
  enc = Encoder(cfg)
  variables = _init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(variables)))
  out = jax.jit(lambda v: enc.apply(v, IDS, SEGMENTS, POSITIONS))(variables)
  assert out.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  ref = Encoder(CFG).apply(variables, IDS, SEGMENTS, POSITIONS)
  assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.1
  table = word_embedding_table(variables["params"])
  head = MlmHead(cfg)
  hid = gather_positions(out, np.array([[1, 3]]))
  logits = head.apply(head.init(jax.random.key(1), hid, table), hid, table)
  assert logits.dtype == jnp.float32


def test_every_param_has_logical_axes():
  variables = _init()
  head = MlmHead(CFG)
  hid = jnp.zeros((1, 2, 32))
  head_vars = head.init(jax.random.key(1), hid, word_embedding_table(variables["params"]))
  for tree in (variables, head_vars):
    specs = nn.get_partition_spec(tree)
    arrays = nn.meta.unbox(tree)
    flat_specs = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_arrays = jax.tree_util.tree_leaves(arrays)
    assert len(flat_specs) == len(flat_arrays)
    for (path, spec), array in zip(flat_specs, flat_arrays):
      assert isinstance(spec, PartitionSpec) and len(spec) == array.ndim, (path, spec)
      assert any(name is not None for name in spec), path
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["embeddings"]["word_embeddings"]["embedding"] == PartitionSpec("vocab", "embed")
  assert specs["layer_0"]["attention"]["query"]["kernel"] == PartitionSpec("embed", "heads", "kv")
  assert specs["layer_0"]["attention"]["output"]["kernel"] == PartitionSpec("heads", "kv", "embed")
  assert specs["layer_1"]["intermediate"]["kernel"] == PartitionSpec("embed", "mlp")
  assert specs["layer_1"]["output"]["kernel"] == PartitionSpec("mlp", "embed")
  assert nn.get_partition_spec(head_vars)["params"]["bias"] == PartitionSpec("vocab")


def test_init_values():
  params = nn.meta.unbox(_init())["params"]
  ln = params["layer_0"]["LayerNorm"]
  np.testing.assert_array_equal(ln["scale"], 1.0)
  np.testing.assert_array_equal(ln["bias"], 0.0)
  np.testing.assert_array_equal(params["layer_0"]["attention"]["query"]["bias"], 0.0)
  std = float(np.std(params["embeddings"]["word_embeddings"]["embedding"]))
  assert 0.015 < std < 0.025


@pytest.mark.parametrize("kwargs, field", [
    (dict(hidden_size=30, num_heads=4), "hidden_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_layers=0), "num_layers"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    (dict(dtype="int32"), "dtype"),
    (dict(param_dtype="notadtype"), "param_dtype"),
])
def test_config_validation(kwargs, field):
  base = dict(vocab_size=64, hidden_size=32, num_heads=4)
  base.update(kwargs)
  with pytest.raises(ValueError, match=field):
    EncoderConfig(**base)


def test_mlm_head_checks_embedding_shape():
  head = MlmHead(CFG)
  with pytest.raises(ValueError, match="word-embedding table"):
    head.init(jax.random.key(0), jnp.zeros((1, 2, 32)), jnp.zeros((10, 32)))


@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 7)])
def test_add_vocab_bias_gradient_is_the_row_sum(shape):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=shape), jnp.float32)
  bias = jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32)
  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
  loss = lambda x, b: jnp.sum(jnp.sin(add_vocab_bias(x, b)) * weights)
  g_x, g_b = jax.jit(jax.grad(loss, argnums=(0, 1)))(logits, bias)
  upstream = np.cos(np.asarray(logits) + np.asarray(bias)) * np.asarray(weights)
  np.testing.assert_allclose(add_vocab_bias(logits, bias), logits + bias)
  np.testing.assert_allclose(g_x, upstream, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_b, upstream.reshape(-1, shape[-1]).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", [
    ((2, 3, 4), (4, 5), (((2,), (0,)), ((), ()))),      # A Dense layer: flattened to rows.
    ((2, 3, 4), (4, 5, 6), (((2,), (0,)), ((), ()))),   # A kernel with several output axes.
    ((3, 4), (4, 5), (((1,), (0,)), ((), ()))),         # Already rows.
    ((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,)))),  # Batched: lax.dot_general as is.
    ((2, 3, 4), (5, 4), (((2,), (1,)), ((), ()))),      # The tied [V, K] table: rows.
    ((2, 3, 4), (3, 5), (((1,), (0,)), ((), ()))),      # Not the last axis: as is.
])
def test_rows_dot_general_matches_lax_dot_general(lhs_shape, rhs_shape, dims):
  from pretrain.models import layers  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.normal(size=lhs_shape), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=rhs_shape), jnp.float32)
  expected = jax.lax.dot_general(lhs, rhs, dims)
  out_weights = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)
  loss = lambda f: lambda a, b: jnp.sum(f(a, b, dims) * out_weights)
  got = layers.rows_dot_general(lhs, rhs, dims)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  for g, e in zip(jax.grad(loss(layers.rows_dot_general), argnums=(0, 1))(lhs, rhs),
                  jax.grad(loss(jax.lax.dot_general), argnums=(0, 1))(lhs, rhs)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation,x_shape,kernel_shape", [
    ("blh,hnd->blnd", (2, 3, 8), (8, 2, 4)),   # Attention's projections: rows.
    ("blnd,ndh->blh", (2, 3, 2, 4), (2, 4, 8)),  # Attention's output: rows.
    ("blh,hgf->blgf", (2, 3, 8), (8, 2, 5)),   # A gated kernel: rows too (GatedDense splits it).
    ("blh,hnd->bnld", (2, 3, 8), (8, 2, 4)),   # Output axes reordered: jnp.einsum.
    ("blh,dh->bld", (2, 3, 8), (5, 8)),        # Kernel contracted last: jnp.einsum.
])
def test_rows_einsum_matches_jnp_einsum(equation, x_shape, kernel_shape):
  from pretrain.models import layers  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
  expected = jnp.einsum(equation, x, kernel)
  out_weights = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)
  loss = lambda f: lambda a, b: jnp.sum(f(equation, a, b) * out_weights)
  np.testing.assert_allclose(layers.rows_einsum(equation, x, kernel), expected, rtol=1e-5,
                             atol=1e-5)
  for g, e in zip(jax.grad(loss(layers.rows_einsum), argnums=(0, 1))(x, kernel),
                  jax.grad(loss(jnp.einsum), argnums=(0, 1))(x, kernel)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_gated_dense_is_the_einsum_of_its_kernel():
  from pretrain.models import layers  # pylint: disable=import-outside-toplevel
  cfg = EncoderConfig(vocab_size=64, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=6,
                      max_len=16, mlp="geglu")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8)), jnp.float32)
  module = layers.GatedDense(cfg)
  params = module.init(jax.random.key(0), x)["params"]
  kernel, bias = nn.unbox(params["kernel"]), nn.unbox(params["bias"])
  bias = jnp.arange(bias.size, dtype=jnp.float32).reshape(bias.shape)  # Zeros would hide a swap.
  input_BLF, gate_BLF = module.apply({"params": {"kernel": kernel, "bias": bias}}, x)
  expected = jnp.einsum("blh,hgf->blgf", x, kernel) + bias
  np.testing.assert_allclose(input_BLF, expected[:, :, 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gate_BLF, expected[:, :, 1], rtol=1e-5, atol=1e-5)


def test_rows_dot_general_keeps_the_preferred_element_type():
  from pretrain.models import layers  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4)).astype(np.float32)
  table = rng.normal(size=(7, 4)).astype(np.float32)
  got = layers.rows_dot_general(jnp.asarray(x, jnp.bfloat16), jnp.asarray(table, jnp.bfloat16),
                                (((2,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  assert got.shape == (2, 3, 7) and got.dtype == jnp.float32
  bf = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(got, np.einsum("bme,ve->bmv", bf(x), bf(table)), rtol=1e-2,
                             atol=1e-2)


def test_gelu_and_its_written_out_derivative_match_torch():
  import torch  # pylint: disable=import-outside-toplevel

  from pretrain.models import layers  # pylint: disable=import-outside-toplevel
  x = np.concatenate([np.linspace(-9, 9, 1001), [0.0, -30.0, 30.0]]).astype(np.float32)
  xt = torch.tensor(x, requires_grad=True)
  torch.nn.functional.gelu(xt).sum().backward()
  want_y, want_dy = torch.nn.functional.gelu(xt).detach().numpy(), xt.grad.numpy()
  xj = jnp.asarray(x)
  dy = jax.grad(lambda v: layers.gelu(v).sum())(xj)
  np.testing.assert_allclose(layers.gelu(xj), want_y, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(dy, want_dy, atol=1e-6, rtol=1e-6)
  # Forward mode (the dependence tests take jacobians) gives the same derivative.
  np.testing.assert_allclose(jax.vmap(jax.jacfwd(layers.gelu))(xj), dy, rtol=1e-7)
