"""GradCache's memory and speed: the contrastive train step at large global batches, with and without.

  python bench/grad_cache.py [--batches=64,1024,4096] [--chunk=64] [--config=configs/contriever.py]
      [--time_batches=64,1024] [--repeats=2]

The step is configs/contriever.py's at demo size (Contriever crops of a 128-token chunk: two rows
of 66 tokens per pair, mean pooling, in-batch negatives over the global batch), compiled for
each global batch as it runs in pretraining (AdamW, donation). Memory is XLA's plan of the
compiled step (`memory_analysis()`: arguments + outputs + temporaries - aliased), the peak the
step needs on a device; nothing is allocated to measure it. tokens/s is timed over --repeats
steps after one warm-up, for the batches in --time_batches (a 4,096-pair step takes minutes on
2 CPU cores). One JSON line per (batch, chunk), then a markdown table.
"""
import argparse
import functools
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import equal_compute  # noqa: E402
from objectives import registry  # noqa: E402
from pretrain.training import optimizer as optimizer_lib, state as state_lib  # noqa: E402
from pretrain.training import step as step_lib  # noqa: E402


def full_rows(key, batch_size, length, vocab):
  """Rows without padding (every pair costs its full length): ids, segment ids or positions."""
  if key.endswith("segment_ids"):
    return jnp.ones((batch_size, length), jnp.int32)
  if key.endswith("positions"):
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))
  return jnp.asarray(np.random.default_rng(0).integers(5, vocab, (batch_size, length)), jnp.int32)


def compiled_step(spec, batch_size, chunk):
  config = equal_compute.load_config(equal_compute.with_args(spec, batch_size=batch_size))
  config.objective.grad_cache_chunk = chunk if chunk < batch_size else 0
  vocab = config.data.tokenizer.vocab_size
  tokenizer = types.SimpleNamespace(vocab_size=vocab, word_start_table=lambda: np.zeros(vocab, bool))
  objective = registry.build(config, tokenizer)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  seq_len = config.data.seq_len
  # Copies: init may hand out one zeros buffer for several leaves, which donation refuses.
  state = jax.tree.map(jnp.copy, nn.unbox(state_lib.init_state(jax.random.key(0), objective, tx,
                                                                seq_len)))
  batch = {k: full_rows(k, batch_size, v.shape[1], vocab)
           for k, v in objective.example_batch(seq_len).items()}
  step = jax.jit(functools.partial(step_lib.train_step, objective=objective, tx=tx,
                                   schedule=schedule, accum_steps=1), donate_argnums=0)
  started = time.perf_counter()
  compiled = step.lower(state, batch, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - started
  tokens = batch_size * sum(v.shape[1] for k, v in batch.items() if "segment" in k)
  return compiled, state, batch, compile_s, tokens


def peak_bytes(compiled):
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/contriever.py")
  parser.add_argument("--batches", default="64,1024,4096")
  parser.add_argument("--chunk", type=int, default=64, help="GradCache rows per chunk")
  parser.add_argument("--time_batches", default="64,1024")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--without_max", type=int, default=0,
                      help="largest batch also run without GradCache (0: every batch)")
  args = parser.parse_args()
  timed = {int(b) for b in args.time_batches.split(",") if b}
  rows = []
  for batch_size in (int(b) for b in args.batches.split(",")):
    for chunk in sorted({0, args.chunk}):
      if chunk >= batch_size or (not chunk and args.without_max and batch_size > args.without_max):
        continue
      compiled, state, batch, compile_s, tokens = compiled_step(args.config, batch_size, chunk)
      row = {"batch": batch_size, "grad_cache_chunk": chunk, "peak_mib": peak_bytes(compiled) / 2**20,
             "compile_s": compile_s, "tokens_per_step": tokens, "tokens_per_s": None}
      if batch_size in timed:
        key = jax.random.key(1)
        state, _ = compiled(state, batch, key)
        jax.block_until_ready(state)
        started = time.perf_counter()
        for _ in range(args.repeats):
          state, _ = compiled(state, batch, key)
        jax.block_until_ready(state)
        row["tokens_per_s"] = tokens * args.repeats / (time.perf_counter() - started)
      print(json.dumps(row), flush=True)
      rows.append(row)
  print("| global batch (pairs) | GradCache chunk | peak memory (MiB) | tokens/s |\n|---|---|---|---|")
  for r in rows:
    speed = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
    print(f"| {r['batch']:,} | {r['grad_cache_chunk'] or 'off'} | {r['peak_mib']:,.0f} | {speed} |")


if __name__ == "__main__":
  main()
