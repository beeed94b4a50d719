"""Two or more variants of our MLM train step compiled in one process and timed alternately.

  python bench/step_ab.py [--cases=demo:128:32,demo:512:8,small:128:16,base:128:4]
                          [--variants=cpu_scheduler=default,cpu_scheduler=memory_optimized]
                          [--rounds=8] [--vocab=32000] [--arch=bert]

A variant is one keyword of bench/train_step.py's `build` (cpu_scheduler=NAME, rng_impl=NAME,
threefry_unrolled=True, scan_layers=True), `top1=argmax|max` for the MLM accuracy's formula
(`objectives.mlm.top1_correct`, or the argmax it replaced), or `rows=True|False` for the
encoder's and the MLM head's matmuls as [B * L, K] rows (`layers.rows_dot_general`,
`layers.rows_einsum`, `layers.gated_halves`) or in their 3-D form as before (one [B, L, 2, F]
einsum for a gated MLP's input layer). Each round runs 5 steps of every variant in turn, so a
machine whose speed drifts between runs (these VMs drift by ±5-10%) slows all variants alike;
the best and median seconds per step over the rounds are printed, one line per variant.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import train_step  # noqa: E402
from objectives import mlm  # noqa: E402
from pretrain.models import layers  # noqa: E402

TOP1 = {"max": mlm.top1_correct,
        "argmax": lambda logits, targets: jnp.argmax(logits, -1) == targets}


def _gated_halves_3d(x_BLH, kernel_H2F):
  h_BL2F = jnp.einsum("blh,hgf->blgf", x_BLH, kernel_H2F)
  return h_BL2F[:, :, 0], h_BL2F[:, :, 1]


# (Dense layers' and the MLM head's dot_general, Einsum layers', a gated MLP's input), as rows or
# in the earlier 3-D form.
ROWS = {True: (layers.rows_dot_general, layers.rows_einsum, layers.gated_halves),
        False: (jax.lax.dot_general, jnp.einsum, _gated_halves_3d)}


def _set_formulas(top1="max", rows=True):
  """Swap in the formulas a variant names; read when the step is traced."""
  mlm.top1_correct = TOP1[top1]
  layers.rows_dot_general, layers.rows_einsum, layers.gated_halves = ROWS[rows]


def parse_variant(text):
  """'key=value' -> (text, {key: value}), with True/False as booleans."""
  key, _, value = text.partition("=")
  return text, {key: {"True": True, "False": False}.get(value, value)}


def time_variants(case, variants, rounds, vocab, arch):
  """{variant: [seconds per step of each round]} for `case` ("size:seq_len:batch")."""
  size, seq_len, batch = case.split(":")
  built = {}
  for name, kwargs in variants:
    kwargs = dict(kwargs)
    _set_formulas(kwargs.pop("top1", "max"), kwargs.pop("rows", True))
    try:
      c, compiled, state, data, key, _ = train_step.build(size, int(seq_len), int(batch), vocab,
                                                          arch=arch, **kwargs)
    finally:
      _set_formulas()
    with train_step.context(c):
      _, state = train_step.time_steps(compiled, state, data, key, steps=1)  # Warm-up.
    built[name] = [c, compiled, state, data, key]
  times = {name: [] for name in built}
  for _ in range(rounds):
    for name, b in built.items():
      c, compiled, state, data, key = b
      with train_step.context(c):
        step_s, b[2] = train_step.time_steps(compiled, state, data, key)
      times[name].append(step_s)
  return times


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", default="demo:128:32,demo:512:8,small:128:16,base:128:4")
  parser.add_argument("--variants", default="cpu_scheduler=default,cpu_scheduler=memory_optimized")
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--arch", default="bert")
  args = parser.parse_args()
  variants = [parse_variant(v) for v in args.variants.split(",")]
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores; {args.rounds} rounds of 5 steps")
  print("| case | variant | best s/step | median s/step | median vs first |")
  print("|---|---|---|---|---|")
  for case in args.cases.split(","):
    times = time_variants(case, variants, args.rounds, args.vocab, args.arch)
    first = statistics.median(next(iter(times.values())))
    for name, ts in times.items():
      median = statistics.median(ts)
      print(f"| {case} | {name} | {min(ts):.3f} | {median:.3f} | {median / first - 1:+.1%} |",
            flush=True)


if __name__ == "__main__":
  main()
