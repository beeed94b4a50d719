"""Scan over layers and remat policies: the same function as the unrolled stack, in another layout.

The references are the unrolled encoder (scanned and rematerialised runs must give its loss,
gradients and every layer's output) and the canonical layer_{i} tree (stack / unstack / export).
"""
import dataclasses
import functools
import json

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from objectives import registry
from objectives.checks import ConfigError
from pretrain import export
from pretrain.models import encoder as enc, encoder_config, stacking
from pretrain.training import checkpointing
from tests.conftest import make_tiny_config
from tests import test_modern_encoder

tokenizer = test_modern_encoder.tokenizer  # The module fixture: a 400-piece sentencepiece model.
BERT = enc.EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32,
                         max_len=32, dropout_rate=0.0)
# Pre-norm with local / global layers alternating (their own masks and rotary bases): layer 0
# (global, no attention_norm) unrolled, then the scanned group of layers 1-2, whose body runs a
# local then a global layer (BERT's two layers scan as two steps).
MODERN = dataclasses.replace(
    BERT, num_layers=3, position="rope", mlp="geglu", pre_norm=True, norm_bias=False,
    use_bias=False, type_vocab_size=0, local_window=4, global_every=2, rope_theta=160000.0,
    layer_norm_eps=1e-5, mlm_head="modernbert")
CONFIGS = {"bert": BERT, "modern": MODERN}


def _rows():
  """Two packed documents per row (10 + 6 tokens), so segments and the window both matter."""
  ids = jnp.asarray(np.random.default_rng(1).integers(0, BERT.vocab_size, (1, 16)), jnp.int32)
  seg = jnp.asarray([[1] * 10 + [2] * 6], jnp.int32)
  pos = jnp.asarray([list(range(10)) + list(range(6))], jnp.int32)
  return ids, seg, pos


@functools.lru_cache(maxsize=None)
def _canonical(name):
  return nn.unbox(enc.Encoder(CONFIGS[name]).init(jax.random.key(0), *_rows())["params"])


@functools.lru_cache(maxsize=None)
def _loss_and_grads(name, scan_layers=False, remat="none"):
  """(loss, canonical gradients, every layer's output) of a random projection of all layers."""
  cfg = dataclasses.replace(CONFIGS[name], scan_layers=scan_layers, remat=remat)
  ids, seg, pos = _rows()
  weights = np.random.default_rng(2).standard_normal((cfg.num_layers + 1, 1, 16, cfg.hidden_size))

  def loss(params):
    outs = enc.Encoder(cfg).apply({"params": params}, ids, seg, pos, return_all_layers=True)
    return sum(jnp.sum(o * w) for o, w in zip(outs, weights.astype(np.float32))), outs

  params = stacking.stack_layers(_canonical(name), cfg) if scan_layers else _canonical(name)
  (value, outs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return float(value), stacking.unstack_layers(grads), outs


def _assert_same(got, want):
  value, grads, outs = got
  np.testing.assert_allclose(value, want[0], rtol=1e-6)
  assert len(outs) == len(want[2])
  for a, b in zip(outs, want[2]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(want[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, want[1])


# The modern stack scans with a remat policy too (one compile fewer; each policy runs once).
@pytest.mark.parametrize("name,remat", [("bert", "none"), ("modern", "dots_saveable")])
def test_scanned_matches_unrolled(name, remat):
  lay = stacking.layout(CONFIGS[name])
  assert (lay.head, lay.group, lay.groups) == ((1, 2, 1) if name == "modern" else (0, 1, 2))
  _assert_same(_loss_and_grads(name, True, remat), _loss_and_grads(name))


@pytest.mark.parametrize("scan_layers,remat", [
    (False, "full"), (True, "dots_with_no_batch_dims_saveable")])
def test_remat_policy_matches_none(scan_layers, remat):
  name = "bert"
  _assert_same(_loss_and_grads(name, scan_layers, remat), _loss_and_grads(name))


def test_stacked_params_carry_the_layers_axis():
  cfg = dataclasses.replace(MODERN, scan_layers=True)
  boxed = jax.eval_shape(enc.Encoder(cfg).init, jax.random.key(0), *_rows())["params"]
  kernel = boxed[stacking.SCANNED]["offset_1"]["attention"]["query"]["kernel"]
  assert kernel.names == ("layers", "embed", "heads", "kv") and kernel.value.shape[0] == 1
  assert sorted(k for k in boxed if k.startswith("layer_")) == ["layer_0"]
  assert dict(common.DEFAULT_AXIS_RULES)["layers"] is None


def test_stack_unstack_round_trip_with_a_tail():
  cfg = dataclasses.replace(MODERN, num_layers=6, scan_layers=True)  # layer 5 stays unrolled
  canonical = {"embeddings": {"w": np.zeros(3)}, "final_norm": {"scale": np.ones(2)},
               **{f"layer_{i}": {"k": np.full((2, 3), i, np.float32)} for i in range(6)}}
  stacked = stacking.stack_layers(canonical, cfg)
  assert sorted(stacked) == ["embeddings", "final_norm", "layer_0", "layer_5", stacking.SCANNED]
  np.testing.assert_array_equal(stacked[stacking.SCANNED]["offset_0"]["k"][:, 0, 0], [1, 3])
  np.testing.assert_array_equal(stacked[stacking.SCANNED]["offset_1"]["k"][:, 0, 0], [2, 4])
  assert stacking.layout_of(stacked) == stacking.layout(cfg)
  for back in (stacking.unstack_layers(stacked), stacking.unstack_all({"e": stacked})["e"],
               stacking.stack_like({"e": canonical}, {"e": stacked})["e"]):
    assert jax.tree.structure(back) in (jax.tree.structure(canonical),
                                        jax.tree.structure(stacked))
  jax.tree.map(np.testing.assert_array_equal, stacking.unstack_layers(stacked), canonical)
  jax.tree.map(np.testing.assert_array_equal,
               stacking.stack_like({"e": canonical, "h": 1}, {"e": stacked})["e"], stacked)


@pytest.mark.parametrize("objective_name", ["mlm", "electra"])
def test_export_of_a_scanned_run_equals_the_unrolled_export(tokenizer, tmp_path, objective_name):
  """ELECTRA's generator is a second scanned encoder (on the discriminator's embeddings)."""
  outs = {}
  for scan_layers in (False, True):
    config = make_tiny_config()
    config.model.update(num_layers=3, max_len=32, scan_layers=scan_layers,
                        remat="full" if scan_layers else "none")
    config.data.tokenizer.vocab_size = tokenizer.vocab_size
    config.objective.name = objective_name
    objective = registry.build(common.validate(config), tokenizer)
    shapes = nn.unbox(jax.eval_shape(objective.init, jax.random.key(0),
                                     objective.example_batch(32)))
    if not scan_layers:
      draw = np.random.default_rng(0).standard_normal
      canonical = jax.tree.map(lambda s, draw=draw: draw(s.shape).astype(s.dtype), shapes)
      params = canonical
    else:
      assert stacking.is_stacked(shapes)
      params = stacking.stack_like(canonical, shapes)
      assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes)
    out = tmp_path / str(scan_layers)
    export.write_export(str(out), config, tokenizer, objective, params, 3, [])
    outs[scan_layers] = out
  for name in ("model.safetensors", "config.json"):
    assert (outs[True] / name).read_bytes() == (outs[False] / name).read_bytes(), name
  written = json.loads((outs[True] / "encoder_config.json").read_text())
  assert (written["scan_layers"], written["remat"]) == (False, "none")
  flat = [flax.serialization.msgpack_restore((outs[s] / "flax_params.msgpack").read_bytes())
          for s in (False, True)]
  jax.tree.map(np.testing.assert_array_equal, flat[1], flat[0])


def test_resume_refuses_a_changed_scan_layers():
  config = make_tiny_config()
  saved = json.loads(config.to_json_best_effort())
  config.model.scan_layers = True
  with pytest.raises(ValueError, match=r"model.scan_layers=False but the config says True.*"
                     r"--config.model.scan_layers=False to resume it.*init_from=wd"):
    checkpointing.check_compatible(saved, config, "wd")
  saved["model"].pop("scan_layers")  # A checkpoint from before the key: unrolled layers.
  with pytest.raises(ValueError, match=r"model.scan_layers=False but the config says True"):
    checkpointing.check_compatible(saved, config, "wd")
  config.model.scan_layers = False
  checkpointing.check_compatible(saved, config, "wd")


def test_unknown_remat_policy_names_the_valid_ones():
  config = make_tiny_config()
  config.model.remat = "everything"
  valid = ", ".join(common.REMAT_POLICIES)
  with pytest.raises(ConfigError, match=f"model.remat.*{valid}"):
    common.validate(config)
  with pytest.raises(ValueError, match=f"EncoderConfig.remat must be one of {valid}"):
    dataclasses.replace(BERT, remat="everything")
  assert common.REMAT_POLICIES == encoder_config.REMAT_POLICIES
