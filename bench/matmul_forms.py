"""The train step's matmul forms alone, each against the alternative that could replace it.

  python bench/matmul_forms.py [--rows=4096] [--hidden=256] [--mlp=1024] [--heads=4]
                               [--seq_len=128] [--rounds=7]

Every pair is jitted separately and timed alternately (best and median of `rounds` rounds),
with the operands of demo 128x32 by default:
  attention   one head's scores and values as batched [B*N, L, D] matmuls (what
              jax.nn.dot_product_attention runs) against a 2-D matmul of the same FLOPs;
  wgrad       a weight gradient X^T dY as XLA emits it (a dot contracting dimension 0 of both,
              which XLA:CPU runs on Eigen, asynchronously) against X^T copied first (a dot that
              XLA:CPU gives YNNPACK), in a two-layer MLP's forward and backward;
  qkv         query, key and value as three [rows, H] @ [H, H] matmuls against one [H, 3H]
              matmul of their stacked kernels, forward and backward.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp


def timed(fns, args, rounds, calls=10):
  """{name: [seconds per call]} over `rounds` alternating rounds of `calls` calls each."""
  for f in fns.values():
    jax.block_until_ready(f(*args))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, f in fns.items():
      start = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(f(*args))
      times[name].append((time.perf_counter() - start) / calls)
  return times


def attention_pair(args):
  groups, length, depth = args.batch * args.heads, args.seq_len, args.hidden // args.heads
  keys = jax.random.split(jax.random.key(0), 2)
  a, b = (jax.random.normal(k, (groups, length, depth)) for k in keys)
  fns = {"batched [B*N, L, D] scores": jax.jit(lambda a, b: jnp.einsum("gld,gmd->glm", a, b)),
         "2-D, same FLOPs": jax.jit(lambda a, b: a.reshape(-1, depth) @ b[0].T)}
  return fns, (a, b), 2 * groups * length * length * depth


@jax.custom_vjp
def _matmul_ynn_wgrad(x, w):
  return x @ w


def _fwd(x, w):
  return x @ w, (x, w)


def _bwd(residuals, dy):
  x, w = residuals
  # The barrier keeps XLA from folding the transpose back into the dot's dimension numbers.
  return dy @ w.T, jax.lax.optimization_barrier(x.T) @ dy


_matmul_ynn_wgrad.defvjp(_fwd, _bwd)


def wgrad_pair(args):
  keys = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(keys[0], (args.rows, args.hidden))
  w1 = jax.random.normal(keys[1], (args.hidden, args.mlp)) * 0.05
  w2 = jax.random.normal(keys[2], (args.mlp, args.hidden)) * 0.05

  def grads(matmul):
    def loss(x, w1, w2):
      y = matmul(jnp.tanh(matmul(x, w1)), w2) + x
      return jnp.sum(y * y)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  fns = {"X^T dY as XLA emits it (Eigen)": grads(lambda a, b: a @ b),
         "X^T copied, then YNNPACK": grads(_matmul_ynn_wgrad)}
  return fns, (x, w1, w2), 3 * 2 * 2 * args.rows * args.hidden * args.mlp


def qkv_pair(args):
  h, heads = args.hidden, args.heads
  keys = jax.random.split(jax.random.key(2), 4)
  x = jax.random.normal(keys[0], (args.rows, h))
  kernels = tuple(jax.random.normal(k, (h, heads, h // heads)) * 0.02 for k in keys[1:])

  def separate(x, kernels):
    return [x @ k.reshape(h, h) for k in kernels]

  def stacked(x, kernels):
    y = (x @ jnp.stack(kernels, axis=2).reshape(h, 3 * h)).reshape(-1, heads, 3, h // heads)
    return [y[:, :, i].reshape(-1, h) for i in range(3)]

  def grads(project):
    def loss(x, kernels):
      q, k, v = project(x, kernels)
      return jnp.sum(jnp.tanh(q) * k * v)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  fns = {"three [H, H] projections": grads(separate), "one stacked [H, 3H]": grads(stacked)}
  return fns, (x, kernels), 3 * 3 * 2 * args.rows * h * h


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rows", type=int, default=4096, help="tokens in the batch (B * L)")
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--mlp", type=int, default=1024)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args()
  args.batch = args.rows // args.seq_len
  print(f"{jax.devices()[0].device_kind}, {args.rows} rows, hidden {args.hidden}, "
        f"MLP {args.mlp}, {args.heads} heads, sequence {args.seq_len}")
  print("| form | best ms | median ms | GFLOP/s at best |\n|---|---|---|---|")
  for pair in (attention_pair, wgrad_pair, qkv_pair):
    fns, operands, flops = pair(args)
    for name, seconds in timed(fns, operands, args.rounds).items():
      best = min(seconds)
      print(f"| {name} | {best * 1e3:.2f} | {statistics.median(seconds) * 1e3:.2f} | "
            f"{flops / best / 1e9:.1f} |")


if __name__ == "__main__":
  main()
