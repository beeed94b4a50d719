"""Exact GELU's forward and backward on CPU: jax.nn.gelu (through erfc, differentiated by JAX)
against `pretrain.models.layers.gelu` (through erf, with its derivative written out).

  python bench/gelu.py [--shape=4096,1024] [--rounds=15]

Both run jitted on the same array, alternating, and the best and median of `rounds` are printed
with the largest differences of their outputs and input gradients.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pretrain.models import layers  # noqa: E402


def value_and_input_grad(fn):
  def run(x, dy):
    y, pull = jax.vjp(fn, x)
    return y, pull(dy)[0]
  return jax.jit(run)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shape", default="4096,1024", help="demo's MLP activations: 32 x 128 tokens")
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args()
  shape = tuple(map(int, args.shape.split(",")))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape) * 2, jnp.float32)
  dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
  fns = {"jax.nn.gelu": value_and_input_grad(lambda v: jax.nn.gelu(v, approximate=False)),
         "layers.gelu": value_and_input_grad(layers.gelu)}
  outs = {name: jax.block_until_ready(fn(x, dy)) for name, fn in fns.items()}
  times = {name: [] for name in fns}
  for _ in range(args.rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(x, dy))
      times[name].append(time.perf_counter() - start)
  print(f"forward + input gradient of {shape}, float32, {jax.devices()[0].device_kind}")
  for name, ts in times.items():
    print(f"{name:<12} best {min(ts) * 1e3:7.2f} ms  median {statistics.median(ts) * 1e3:7.2f} ms")
  (y0, g0), (y1, g1) = outs.values()
  print(f"max |difference|: output {float(jnp.abs(y0 - y1).max()):.1e}, "
        f"gradient {float(jnp.abs(g0 - g1).max()):.1e}")


if __name__ == "__main__":
  main()
