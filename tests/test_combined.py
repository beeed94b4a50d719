"""Combined objectives: one shared encoder, weighted losses, per-component metrics and state."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import common
from tests.conftest import fake_tokenizer, packed_batch
from objectives import registry


def _objective(config, components):
  config.objective.name = "combined"
  config.objective.components = components
  common.validate(config)
  return registry.build(config, fake_tokenizer(500))


def _component_loss(config, name, params, batch, rng):
  config.objective.name = name
  single = registry.build(config, fake_tokenizer(500))
  return single.loss(params, single.init_state(), batch, rng, train=False)[0]


def test_loss_is_the_weighted_sum_of_components_on_one_encoder(tiny_config):
  objective = _objective(tiny_config, "mlm:1.0,crts:0.5")
  batch = packed_batch(np.random.default_rng(0), 4, 32, 500)
  params = nn.unbox(objective.init(jax.random.key(0), batch))
  assert set(params) == {"encoder", "mlm_head", "discriminator_head"}  # one encoder, two heads
  rng = jax.random.key(1)
  loss, (metrics, state) = objective.loss(params, objective.init_state(), batch, rng, train=False)
  # Independently: each objective alone, with the rng the composite gives it, on the same params.
  expected = (1.0 * _component_loss(tiny_config, "mlm", params, batch, jax.random.fold_in(rng, 0))
              + 0.5 * _component_loss(tiny_config, "crts", params, batch, jax.random.fold_in(rng, 1)))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert "mlm/mlm_loss" in metrics and "crts/total_loss" in metrics
  assert set(state) == {"mlm", "crts"} and state["crts"]["confusion_counts"].shape == (100, 100)


def test_gradients_of_both_losses_reach_the_shared_encoder(tiny_config):
  objective = _objective(tiny_config, "mlm:1,rts:1")
  batch = packed_batch(np.random.default_rng(0), 2, 32, 500)
  params = nn.unbox(objective.init(jax.random.key(0), batch))
  grad = lambda p: jax.grad(lambda q: objective.loss(q, objective.init_state(), batch,  # noqa: E731
                                                     jax.random.key(0), train=True)[0])(p)
  g = grad(params)
  assert np.abs(np.asarray(g["mlm_head"]["bias"])).sum() > 0
  assert np.abs(np.asarray(g["discriminator_head"]["dense"]["kernel"])).sum() > 0
  # Zero-weighting RTS removes its contribution to the encoder's gradient.
  only_mlm = _objective(tiny_config, "mlm:1,rts:0")
  g0 = jax.grad(lambda q: only_mlm.loss(q, only_mlm.init_state(), batch, jax.random.key(0),
                                        train=True)[0])(params)
  kernel = lambda t: np.asarray(t["encoder"]["layer_0"]["intermediate"]["kernel"])  # noqa: E731
  assert not np.allclose(kernel(g), kernel(g0))


@pytest.mark.parametrize("components,message", [
    ("mlm:1,nope:1", "distinct name:weight pairs of mlm"),
    ("mlm:1,mlm:2", "distinct name:weight pairs"),
    ("mlm:0", "not all 0"),
    ("mlm:x", "weight 'x' of 'mlm' is not a number"),
])
def test_bad_components_name_the_key(tiny_config, components, message):
  tiny_config.objective.name = "combined"
  tiny_config.objective.components = components
  with pytest.raises(ValueError, match=message):
    common.validate(tiny_config)
