"""model.dtype=bfloat16: bf16 compute, float32 parameters and optimizer state, tracking fp32."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from objectives import registry
from pretrain.training import optimizer as optimizer_lib, state as state_lib, step as step_lib
from tests.conftest import fake_tokenizer, make_tiny_config, packed_batch

STEPS = 20


def _losses(dtype):
  config = make_tiny_config()
  config.model.dtype = dtype
  config.train.steps = STEPS
  objective = registry.build(config, fake_tokenizer(config.data.tokenizer.vocab_size))
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, STEPS)
  state = jax.tree.map(jnp.asarray, nn.unbox(state_lib.init_state(jax.random.key(0), objective,
                                                                  tx, config.data.seq_len)))
  step = jax.jit(functools.partial(step_lib.train_step, objective=objective, tx=tx,
                                   schedule=schedule, accum_steps=1))
  batches = [packed_batch(np.random.default_rng(i), 8, config.data.seq_len,
                          config.data.tokenizer.vocab_size) for i in range(4)]
  losses = []
  for i in range(STEPS):
    state, metrics = step(state, batches[i % 4], jax.random.key(1))
    losses.append(float(metrics["mlm_loss"]))
  return np.asarray(losses), state


def test_bf16_tracks_the_fp32_loss_with_fp32_weights():
  fp32, _ = _losses("float32")
  bf16, state = _losses("bfloat16")
  # The same masks and data: bf16 rounding alone separates the curves (3.5e-4 apart at most when
  # measured on CPU); both learn.
  assert fp32[-5:].mean() < fp32[:5].mean() - 0.1 and bf16[-5:].mean() < bf16[:5].mean() - 0.1
  assert np.max(np.abs(bf16 - fp32)) < 0.02, np.abs(bf16 - fp32).max()
  dtypes = {x.dtype for x in jax.tree.leaves(state.params)}
  moments = {x.dtype for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(
      x.dtype, jnp.floating)}
  assert dtypes == moments == {jnp.dtype("float32")}  # What checkpoints and exports hold.
