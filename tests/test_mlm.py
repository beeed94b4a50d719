"""The MLM objective: loss over masked positions only, whole-word option, a golden first step."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pretrain.training import optimizer as optimizer_lib, sharding
from pretrain.models import encoder as enc
from tests.conftest import fake_tokenizer, packed_batch
from objectives import mlm, registry
from pretrain.training import state as state_lib
from pretrain.training import step as step_lib

# The loss and accuracy after the first step of `tiny_config` on `packed_batch(seed 0)`. If a change
# to initialisation, masking, the model or the optimizer moves these on purpose, update them and
# say so in the commit; otherwise something changed the numerics by accident.
GOLDEN_STEP0_LOSS = 6.2524619
GOLDEN_STEP1_LOSS = 6.1877995


def _setup(config):
  objective = registry.build(config, fake_tokenizer(config.data.tokenizer.vocab_size))
  params = nn.unbox(objective.init(jax.random.key(0), packed_batch(np.random.default_rng(0), 1, 32, 500)))
  return objective, params


def test_loss_counts_only_masked_positions(tiny_config):
  objective, params = _setup(tiny_config)
  batch = packed_batch(np.random.default_rng(1), 4, 32, 500)
  rng = jax.random.key(3)
  loss, (metrics, _) = objective.loss(params, {}, batch, rng, train=False)
  # Independent computation: full-length logits, cross-entropy picked at the masked positions.
  masked = objective.mask(jax.random.split(rng)[0], jnp.asarray(batch["input_ids"]))
  hidden = objective.encoder_module.apply({"params": params["encoder"]}, masked.input_ids,
                                          batch["segment_ids"], batch["positions"])
  logits = objective.head_module.apply({"params": params["mlm_head"]}, hidden,
                                       enc.word_embedding_table(params["encoder"]))
  selected = np.zeros(batch["input_ids"].shape, bool)
  np.put_along_axis(selected, np.asarray(masked.positions), np.asarray(masked.weights) > 0, 1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(batch["input_ids"]))
  np.testing.assert_allclose(loss, np.asarray(ce)[selected].mean(), rtol=1e-5)
  assert int(metrics["mlm_loss"][1]) == selected.sum()
  assert not selected[batch["segment_ids"] == 0].any(), "a padding position was predicted"


def test_whole_word_objective_trains(tiny_config):
  tiny_config.objective.whole_word = True
  objective, params = _setup(tiny_config)
  batch = packed_batch(np.random.default_rng(2), 4, 32, 500)
  loss, (metrics, _) = objective.loss(params, {}, batch, jax.random.key(0), train=True)
  assert np.isfinite(loss) and float(metrics["mlm_loss"][1]) > 0


def _one_step_losses(config, rng_impl="threefry2x32"):
  objective = registry.build(config, fake_tokenizer(500))
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.axis_rules)
  state, shardings = state_lib.sharded_init(jax.random.key(0, impl=rng_impl), objective, tx, 32, mesh,
                                        rules)
  step = jax.jit(functools.partial(step_lib.train_step, objective=objective, tx=tx, schedule=schedule,
                                   accum_steps=config.optimizer.grad_accum_steps))
  batch = packed_batch(np.random.default_rng(0), 8, 32, 500)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for _ in range(2):
      state, m = step(state, batch, jax.random.key(1, impl=rng_impl))
      losses.append(float(m["mlm_loss"]))
  return losses


def test_golden_first_steps(tiny_config):
  tiny_config.optimizer.update(warmup_steps=0, learning_rate=1e-3)
  tiny_config.model.dropout_rate = 0.1  # The golden values include dropout.
  losses = _one_step_losses(tiny_config)
  assert losses[1] < losses[0], f"one AdamW step on the same batch did not lower the loss: {losses}"
  expected = [GOLDEN_STEP0_LOSS, GOLDEN_STEP1_LOSS]
  np.testing.assert_allclose(
      losses, expected, rtol=2e-5,
      err_msg="The first two MLM losses of the tiny config changed: initialisation, masking, model "
              "or optimizer numerics moved. Update GOLDEN_* only if that change was intended.")


def test_faster_rng_impl_trains(tiny_config, rng_impl="unsafe_rbg"):  # rbg: other key splits
  """config.rng_impl: init, masking and dropout all draw from the other generator, and train."""
  tiny_config.optimizer.update(warmup_steps=0, learning_rate=1e-3)
  tiny_config.model.dropout_rate = 0.1
  losses = _one_step_losses(tiny_config, rng_impl)
  assert np.isfinite(losses).all() and losses[1] < losses[0]
  assert abs(losses[0] - GOLDEN_STEP0_LOSS) > 1e-4  # Not threefry's numbers.


def test_gradient_accumulation_averages_micro_batch_gradients(tiny_config):
  tiny_config.optimizer.grad_accum_steps = 2
  objective = registry.build(tiny_config, fake_tokenizer(500))
  tx, schedule = optimizer_lib.make_optimizer(tiny_config.optimizer, 10)
  state = nn.unbox(state_lib.init_state(jax.random.key(0), objective, tx, 32))
  batch = packed_batch(np.random.default_rng(0), 8, 32, 500)
  rng = jax.random.key(1)
  new_state, _ = jax.jit(functools.partial(step_lib.train_step, objective=objective, tx=tx,
                                           schedule=schedule, accum_steps=2))(state, batch, rng)
  # By hand: rows i::2 form micro-batch i, with the step's rng folded with i; gradients averaged.
  step_rng = jax.random.fold_in(rng, 0)
  grad = jax.grad(lambda p, b, r: objective.loss(p, {}, b, r, train=True)[0])

  @jax.jit  # One compiled program (op-by-op dispatch of the same math is slow on CPU).
  def by_hand(params, opt_state, batch):
    grads = [grad(params, {k: v[i::2] for k, v in batch.items()}, jax.random.fold_in(step_rng, i))
             for i in range(2)]
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    updates, _ = tx.update(mean, opt_state, params)
    return optax.apply_updates(params, updates)

  expected = by_hand(state.params, state.opt_state, batch)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_top1_correct_is_argmax_with_ties_counted_for_the_target():
  logits = np.random.default_rng(0).normal(size=(3, 5, 40)).astype(np.float32)
  targets = np.random.default_rng(1).integers(0, 40, (3, 5))
  targets[0, :] = logits[0].argmax(-1)  # A row of sure hits among the random guesses.
  np.testing.assert_array_equal(mlm.top1_correct(logits, targets),
                                logits.argmax(-1) == targets)
  tied = np.zeros((1, 1, 4), np.float32)  # argmax picks id 0; id 2 holds the same maximum.
  assert bool(mlm.top1_correct(tied, np.array([[2]]))[0, 0])
