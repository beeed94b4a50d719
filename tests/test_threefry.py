"""config.threefry_unrolled: threefry2x32 emitted inline on CPU draws exactly the same bits."""
import jax
import jax.numpy as jnp
import numpy as np

from pretrain.training import threefry


def _draws(key):
  return (jax.random.bits(key, (4, 33), jnp.uint32), jax.random.bernoulli(key, 0.9, (5, 7)),
          jax.random.permutation(key, 50))


def _compiled(unrolled):
  threefry.set_cpu_lowering(unrolled)
  return jax.jit(lambda k: _draws(k)).lower(jax.random.key(3)).compile()


def test_unrolled_threefry_draws_the_same_bits_without_a_loop():
  try:
    rolled, unrolled = _compiled(False), _compiled(True)
  finally:
    threefry.set_cpu_lowering(False)
  key = jax.random.key(3)
  for a, b in zip(rolled(key), unrolled(key)):
    np.testing.assert_array_equal(a, b)
  assert " while(" in rolled.as_text()
  assert " while(" not in unrolled.as_text()
