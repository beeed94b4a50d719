"""One MLM train step of a recipe (BERT or ModernBERT) with one attention implementation: JSON.

  python bench/gpu_step.py --recipe=bert|modernbert --size=base --seq_len=512 --batch=64 \
      --attention=xla|cudnn|pallas_gpu|splash|auto [--interpret] [--dtype=bfloat16]

The recipe is configs/bert.py or configs/modernbert.py at that size, length and batch, in `dtype`
with `model.attention`; a config the implementation cannot run is refused by config validation
(as a training run would be) and printed as a row with "skipped" and the reason. Prints one JSON
line: compile seconds, median step seconds, tokens/s, model FLOPs per token (bench/train_step.py's
count), MFU against the device's dense bf16 peak (pretrain/training/flops.py's table; the measured
matmul peak on CPU), XLA's FLOPs of the step, and peak memory (the device's peak bytes in use
where it reports them, else the compiled step's arguments + temporaries). `--interpret` runs the
Pallas kernels in interpret mode, for a dry run on CPU (bench/gpu.sh DRY=1).
"""
import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import hf_step, train_step  # noqa: E402
from configs import bert, common, modernbert  # noqa: E402
from objectives import registry  # noqa: E402
from pretrain.training import flops, optimizer as optimizer_lib, sharding  # noqa: E402
from pretrain.training import state as state_lib, step as step_lib  # noqa: E402

RECIPES = {"bert": bert.get_config, "modernbert": modernbert.get_config}


def recipe_config(recipe, size, seq_len, batch, vocab, dtype, attention, interpret):
  c = RECIPES[recipe](f"size={size},seq_len={seq_len},batch_size={batch},vocab_size={vocab}")
  c.model.max_len = max(c.model.max_len, seq_len)
  c.model.update(dtype=dtype, attention=attention, attention_interpret=interpret)
  return common.validate(c)


def compiled_step(c):
  """(compiled train step, state, batch, key, compile seconds, XLA FLOPs) of config `c`."""
  seq_len, batch, vocab = c.data.seq_len, c.data.batch_size, c.data.tokenizer.vocab_size
  objective = registry.build(c, train_step._Vocab(vocab))  # pylint: disable=protected-access
  tx, schedule = optimizer_lib.make_optimizer(c.optimizer, 1000)
  mesh, rules = sharding.make_mesh(c.mesh), sharding.rules(c.axis_rules)
  state, shardings = state_lib.sharded_init(jax.random.key(0), objective, tx, seq_len, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  step = jax.jit(functools.partial(step_lib.train_step, objective=objective, tx=tx,
                                   schedule=schedule, accum_steps=1),
                 in_shardings=(shardings, batch_sharding, None), out_shardings=(shardings, None),
                 donate_argnums=0)
  ids = np.random.default_rng(0).integers(5, vocab, (batch, seq_len)).astype(np.int32)
  ids[:, 0], ids[:, -1] = 2, 3
  data = sharding.global_batch({"input_ids": ids, "segment_ids": np.ones_like(ids),
                                "positions": np.tile(np.arange(seq_len, dtype=np.int32),
                                                     (batch, 1))}, batch_sharding)
  key = jax.random.key(1)
  with train_step.context(c):
    t = time.perf_counter()
    lowered = step.lower(state, data, key)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, state, data, key, compile_s, float((cost or {}).get("flops", 0.0))


def peak_memory_mib(compiled):
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.temp_size_in_bytes) / 2**20 if m else 0.0


def run(c, repeats):
  compiled, state, data, key, compile_s, xla_flops = compiled_step(c)
  carry = {"state": state}

  def one_step():
    carry["state"], metrics = compiled(carry["state"], data, key)
    jax.block_until_ready(metrics)

  with train_step.context(c):
    _, step_s = hf_step.time_steps(one_step, repeats, steps_per_repeat=3)
  return dict(compile_s=compile_s, step_s=step_s, xla_flops=xla_flops,
              peak_memory_mib=peak_memory_mib(compiled))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--recipe", choices=tuple(RECIPES), default="bert")
  parser.add_argument("--size", default="base")
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--dtype", default="bfloat16", choices=common.DTYPES)
  parser.add_argument("--attention", default="xla")
  parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU).")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  row = dict(framework="ours", recipe=args.recipe, size=args.size, seq_len=args.seq_len,
             batch=args.batch, vocab=args.vocab, dtype=args.dtype, attention=args.attention,
             device=jax.devices()[0].device_kind)
  try:
    c = recipe_config(args.recipe, args.size, args.seq_len, args.batch, args.vocab, args.dtype,
                      args.attention, args.interpret)
  except common.ConfigError as e:
    print(json.dumps(dict(row, skipped=str(e))), flush=True)
    return
  peak, peak_source = flops.machine_peak_flops()
  row.update(run(c, args.repeats))
  tokens_per_s = args.batch * args.seq_len / row["step_s"]
  per_token = train_step.flops_per_token(c.model, args.vocab, args.seq_len, c.objective.mask_rate)
  row.update(tokens_per_s=tokens_per_s, flops_per_token=per_token, peak_flops=peak,
             peak_source=peak_source, mfu=tokens_per_s * per_token / peak if peak else 0.0,
             xla_mfu=row["xla_flops"] / row["step_s"] / peak if peak else 0.0)
  print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
