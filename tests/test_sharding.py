"""Sharded training on 8 fake CPU devices gives the one-device numbers; placements are as designed."""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common
from pretrain.training import checkpointing, optimizer as optimizer_lib, sharding
from tests.conftest import fake_tokenizer, make_tiny_config, packed_batch
from objectives import registry
from pretrain.training import state as state_lib
from pretrain.training import step as step_lib

MESHES = {
    "data": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
    "tensor": {"data": 4, "fsdp": 1, "tensor": 2},
    "mixed": {"data": 2, "fsdp": 2, "tensor": 2},
}


# Every ModernBERT option of the encoder (tests/test_modern_encoder.py), the vocabulary padded.
MODERN = dict(position="rope", rope_theta=160000.0, mlp="geglu", pre_norm=True, norm_bias=False,
              use_bias=False, type_vocab_size=0, layer_norm_eps=1e-5, local_window=8,
              global_every=3, mlm_head="modernbert", vocab_multiple=64)


def _config(tiny_config, **model):
  tiny_config.model.dropout_rate = 0.0
  tiny_config.model.update(model)
  tiny_config.optimizer.warmup_steps = 0
  return tiny_config


def _losses(config, mesh_config, devices, steps=3, state=None):
  objective = registry.build(config, fake_tokenizer(500))
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  mesh = sharding.make_mesh(mesh_config, devices)
  rules = sharding.rules(config.axis_rules)
  if state is None:
    state, shardings = state_lib.sharded_init(jax.random.key(0), objective, tx, 32, mesh, rules)
  else:
    _, shardings = state_lib.abstract_state(objective, tx, 32, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = jax.jit(functools.partial(step_lib.train_step, objective=objective, tx=tx, schedule=schedule,
                                   accum_steps=1),
                 in_shardings=(shardings, batch_sharding, None), out_shardings=(shardings, None))
  losses, rng = [], np.random.default_rng(0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for _ in range(steps):
      batch = sharding.global_batch(packed_batch(rng, 8, 32, 500), batch_sharding)
      state, m = step(state, batch, jax.random.key(1))
      losses.append(float(m["mlm_loss"]))
  return losses, state


@pytest.fixture(scope="module")
def one_device_losses():
  """The reference every mesh is compared with, computed once for the module."""
  return _losses(_config(make_tiny_config()), {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])[0]


@pytest.mark.parametrize("name", MESHES)
def test_sharded_losses_match_one_device(tiny_config, one_device_losses, name):
  sharded, _ = _losses(_config(tiny_config), MESHES[name], jax.devices())
  np.testing.assert_allclose(sharded, one_device_losses, rtol=1e-5)


@pytest.fixture(scope="module")
def modern_one_device_losses():
  return _losses(_config(make_tiny_config(), **MODERN), {"data": 1, "fsdp": 1, "tensor": 1},
                 jax.devices()[:1])[0]


@pytest.mark.parametrize("name", ["fsdp", "tensor"])
def test_modern_encoder_sharded_losses_match_one_device(tiny_config, modern_one_device_losses,
                                                        name):
  sharded, state = _losses(_config(tiny_config, **MODERN), MESHES[name], jax.devices())
  np.testing.assert_allclose(sharded, modern_one_device_losses, rtol=1e-5)
  # The gated MLP's pair axis is unnamed, its width follows "mlp"; the padded table "vocab".
  kernel = state.params["encoder"]["layer_1"]["intermediate"]["kernel"]
  assert kernel.shape == (64, 2, 256) and tuple(kernel.sharding.spec) == ("fsdp", None, "tensor")
  assert state.params["encoder"]["embeddings"]["word_embeddings"]["embedding"].shape == (512, 64)


def test_parameter_partition_specs_are_golden(tiny_config):
  objective = registry.build(tiny_config, fake_tokenizer(500))
  tx, _ = optimizer_lib.make_optimizer(tiny_config.optimizer, 10)
  mesh = sharding.make_mesh(MESHES["mixed"])
  _, shardings = state_lib.abstract_state(objective, tx, 32, mesh, sharding.rules(common.DEFAULT_AXIS_RULES))
  specs = jax.tree.map(lambda s: tuple(s.spec), shardings.params)
  layer = specs["encoder"]["layer_0"]
  assert specs["encoder"]["embeddings"]["word_embeddings"]["embedding"] == ("tensor", "fsdp")
  assert layer["attention"]["query"]["kernel"] == ("fsdp", "tensor", None)
  assert layer["attention"]["output"]["kernel"] == ("tensor", None, "fsdp")
  assert layer["intermediate"]["kernel"] == ("fsdp", "tensor")
  assert layer["output"]["kernel"] == ("tensor", "fsdp")
  assert specs["mlm_head"]["bias"] == ("tensor",)
  # Adam moments follow their parameters.
  mu = jax.tree.map(lambda s: tuple(s.spec), shardings.opt_state[1][0].mu)
  assert mu["encoder"]["layer_0"]["intermediate"]["kernel"] == ("fsdp", "tensor")


def test_fsdp_leaves_no_large_parameter_replicated(tiny_config):
  objective = registry.build(tiny_config, fake_tokenizer(500))
  tx, _ = optimizer_lib.make_optimizer(tiny_config.optimizer, 10)
  mesh = sharding.make_mesh(MESHES["fsdp"])
  target, _ = state_lib.abstract_state(objective, tx, 32, mesh, sharding.rules(common.DEFAULT_AXIS_RULES))
  sharding.assert_sufficiently_sharded(target.params, mesh, min_size=1024)


def test_restore_on_another_mesh_continues_with_same_losses(tiny_config, tmp_path):
  config = _config(tiny_config)
  first, state = _losses(config, MESHES["fsdp"], jax.devices(), steps=2)
  mngr = checkpointing.ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(2, args=checkpointing.ocp.args.Composite(state=checkpointing.ocp.args.StandardSave(state)))
  mngr.wait_until_finished()
  expected, _ = _losses(config, MESHES["fsdp"], jax.devices(), steps=1, state=state)

  objective = registry.build(config, fake_tokenizer(500))
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  four = {"data": 2, "fsdp": 1, "tensor": 2}
  mesh = sharding.make_mesh(four, jax.devices()[:4])
  target, _ = state_lib.abstract_state(objective, tx, 32, mesh, sharding.rules(config.axis_rules))
  with jax.set_mesh(mesh):
    restored = checkpointing.restore_state_only(mngr, target)
  assert restored.params["encoder"]["layer_0"]["intermediate"]["kernel"].sharding.mesh.size == 4
  resumed, _ = _losses(config, four, jax.devices()[:4], steps=1, state=restored)
  np.testing.assert_allclose(resumed, expected, rtol=1e-5)
