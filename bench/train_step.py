"""Train-step throughput and model FLOPs utilisation (MFU) of our MLM step on this machine.

  python bench/train_step.py [--configs=demo,small] [--seq_lens=128] [--batch=32] [--repeats=5]
                             [--archs=bert,modern] [--vocab=16000] [--dtype=float32|bfloat16]
                             [--peak_tflops=X]
                             [--rng_impl=threefry2x32|rbg|unsafe_rbg] [--threefry_unrolled] [--json]
                             [--cpu_devices=N] [--cpu_scheduler=default|memory_optimized]

MFU is useful FLOPs per second over the machine's measured fp32 matmul peak (a large jitted
matmul), not a datasheet number. Useful FLOPs per token follow the usual 6 x (parameters in
matmuls) + attention accounting, with the vocabulary projection counted only at the masked
positions that MLM actually computes. Compile time is reported separately; the step time is
the median of `repeats` timed runs of 5 steps each. On an accelerator pass `--peak_tflops` (the
datasheet dense peak for the dtype, e.g. 989 for an H100 in bf16) instead of measuring one.
`--cpu_devices=N` splits the host into N XLA CPU devices (`jax_num_cpu_devices`, what
`XLA_FLAGS=--xla_force_host_platform_device_count=N` does for any command) and the batch over
them (data parallel); the peak is still one device's large matmul, which uses every core.
`--json` prints one JSON object per configuration (bench/compare.py and bench/gpu.sh read them).
"""
import argparse
import contextlib
import functools
import json
import resource
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import common, demo  # noqa: E402
from objectives import masking  # noqa: E402
from pretrain.training import optimizer as optimizer_lib, sharding
from objectives import registry
from pretrain.training import run as run_lib, state as state_lib
from pretrain.training import threefry
from pretrain.training import step as step_lib


class _Vocab:
  def __init__(self, size):
    self.vocab_size = size

  def word_start_table(self):
    return np.zeros(self.vocab_size, bool)


def matmul_peak(n=2048, repeats=10, dtype=jnp.float32):
  """Measured FLOP/s of a large square matmul (the best of `repeats`)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2 * n**3 / best


def _timed(fn):
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def flops_per_token(m, vocab, seq_len, mask_rate):
  """Training FLOPs per token: 3 x forward (forward + backward)."""
  mlp_matrices = 2 if m.mlp == "gelu" else 3  # a gated MLP's input projection is twice as wide
  layer = (2 * (4 * m.hidden_size**2 + mlp_matrices * m.hidden_size * m.mlp_dim)
           + 4 * seq_len * m.hidden_size)
  slots = masking.max_predictions(seq_len, mask_rate) / seq_len
  head = slots * 2 * (m.hidden_size**2 + m.hidden_size * vocab)
  return 3 * (m.num_layers * layer + head)


def build(size, seq_len, batch, vocab=16000, dtype="float32", rng_impl="threefry2x32",
          arch="bert", threefry_unrolled=False, scan_layers=False, cpu_scheduler=None):
  """The compiled MLM train step of `configs/demo.py` at this shape, with its first state, a batch
  of random ids and a key: `(config, compiled, state, data, key, compile_s)`. Call `compiled`
  inside `context(config)`. `cpu_scheduler`: config.train.cpu_scheduler (None: the config's)."""
  c = demo.get_config(f"size={size},seq_len={seq_len},batch_size={batch},vocab_size={vocab},"
                      f"arch={arch}")
  c.model.dropout_rate = 0.1
  c.model.dtype = dtype
  c.threefry_unrolled = threefry_unrolled
  c.model.scan_layers = scan_layers
  if cpu_scheduler is not None:
    c.train.cpu_scheduler = cpu_scheduler
  threefry.set_cpu_lowering(threefry_unrolled)
  objective = registry.build(c, _Vocab(vocab))
  tx, schedule = optimizer_lib.make_optimizer(c.optimizer, 1000)
  mesh = sharding.make_mesh(c.mesh)
  rules = sharding.rules(c.axis_rules)
  state, shardings = state_lib.sharded_init(jax.random.key(0, impl=rng_impl), objective, tx, seq_len,
                                        mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = jax.jit(functools.partial(step_lib.train_step, objective=objective, tx=tx, schedule=schedule,
                                   accum_steps=1),
                 in_shardings=(shardings, batch_sharding, None), out_shardings=(shardings, None),
                 donate_argnums=0, compiler_options=run_lib.compiler_options(c.train))
  rng = np.random.default_rng(0)
  ids = rng.integers(5, vocab, (batch, seq_len)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  data = sharding.global_batch({"input_ids": ids, "segment_ids": np.ones_like(ids),
                                "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))},
                               batch_sharding)
  key = jax.random.key(1, impl=rng_impl)
  with context(c):
    t = time.perf_counter()
    compiled = step.lower(state, data, key).compile()
    compile_s = time.perf_counter() - t
  return c, compiled, state, data, key, compile_s


@contextlib.contextmanager
def context(config):
  """The mesh and logical axis rules the step was compiled under."""
  with jax.set_mesh(sharding.make_mesh(config.mesh)), nn.logical_axis_rules(
      sharding.rules(config.axis_rules)):
    yield


STEPS_PER_REPEAT = 5


def time_steps(compiled, state, data, key, steps=STEPS_PER_REPEAT):
  """(seconds per step over `steps` steps of `compiled` from `state`, the state after them)."""
  t = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, data, key)
  jax.block_until_ready(m)
  return (time.perf_counter() - t) / steps, state


def bench(size, seq_len, batch, repeats, peak, vocab=16000, dtype="float32",
          rng_impl="threefry2x32", arch="bert", threefry_unrolled=False, scan_layers=False,
          cpu_scheduler=None):
  c, compiled, state, data, key, compile_s = build(size, seq_len, batch, vocab, dtype, rng_impl,
                                                   arch, threefry_unrolled, scan_layers,
                                                   cpu_scheduler)
  with context(c):
    state, m = compiled(state, data, key)
    jax.block_until_ready(m)
    times, before = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(repeats):
      step_s, state = time_steps(compiled, state, data, key)
      times.append(step_s)
    after = resource.getrusage(resource.RUSAGE_SELF)
  step_s = statistics.median(times)
  tokens_per_s = batch * seq_len / step_s
  mfu = tokens_per_s * flops_per_token(c.model, vocab, seq_len, c.objective.mask_rate) / peak
  # Page faults and kernel time per step: fresh pages that the allocator maps and the kernel
  # zeroes each step (GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in README Performance).
  steps = repeats * STEPS_PER_REPEAT
  host = dict(page_faults_per_step=(after.ru_minflt - before.ru_minflt) / steps,
              sys_s_per_step=(after.ru_stime - before.ru_stime) / steps)
  return compile_s, step_s, tokens_per_s, mfu, host


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="demo,small")
  parser.add_argument("--seq_lens", default="128")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--vocab", type=int, default=16000)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="Datasheet peak in TFLOP/s; 0 measures a matmul peak instead.")
  parser.add_argument("--rng_impl", default="threefry2x32", choices=common.RNG_IMPLS,
                      help="config.rng_impl: the generator behind dropout and masking bits.")
  parser.add_argument("--threefry_unrolled", action="store_true",
                      help="config.threefry_unrolled: threefry's rounds inline on CPU.")
  parser.add_argument("--scan_layers", action="store_true",
                      help="config.model.scan_layers: one compiled layer body (nn.scan).")
  parser.add_argument("--archs", default="bert",
                      help="configs/demo.py:arch= values (configs/modernbert.py ARCHITECTURES)")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="XLA CPU devices to split the host into (0: JAX's default, one).")
  parser.add_argument("--cpu_scheduler", default=None, choices=common.CPU_SCHEDULERS,
                      help="config.train.cpu_scheduler (default: the config's, memory_optimized).")
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # Before any backend starts.
  peak = args.peak_tflops * 1e12 or matmul_peak(dtype=jnp.dtype(args.dtype))
  if not args.json:
    print(f"devices: {jax.devices()}; {'given' if args.peak_tflops else 'measured'} {args.dtype} "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'config':<8}{'arch':<9}{'seq':>5}{'batch':>7}{'compile s':>11}{'step s':>9}"
          f"{'tokens/s':>11}{'MFU':>7}{'faults/step':>13}{'sys s/step':>12}")
  runs = [(size, arch, seq_len) for size in args.configs.split(",")
          for arch in args.archs.split(",") for seq_len in map(int, args.seq_lens.split(","))]
  for size, arch, seq_len in runs:
    compile_s, step_s, tps, mfu, host = bench(size, seq_len, args.batch, args.repeats, peak,
                                              args.vocab, args.dtype, args.rng_impl, arch,
                                              args.threefry_unrolled, args.scan_layers,
                                              args.cpu_scheduler)
    if args.json:
      print(json.dumps(dict(
          framework="ours", size=size, arch=arch, seq_len=seq_len, batch=args.batch, vocab=args.vocab,
          dtype=args.dtype, device=str(jax.devices()[0].device_kind), compile_s=compile_s,
          step_s=step_s, tokens_per_s=tps, mfu=mfu, peak_flops=peak, **host,
          peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          device_peak_mib=(jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
          / 2**20)), flush=True)
    else:
      print(f"{size:<8}{arch:<9}{seq_len:>5}{args.batch:>7}{compile_s:>11.1f}{step_s:>9.3f}"
            f"{tps:>11,.0f}{mfu:>7.1%}{host['page_faults_per_step']:>13,.0f}"
            f"{host['sys_s_per_step']:>12.3f}", flush=True)


if __name__ == "__main__":
  main()
