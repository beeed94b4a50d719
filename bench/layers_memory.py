"""Scan over layers and remat policies: the train step's compile time and its peak memory.

  python bench/layers_memory.py [--part=compile,memory] [--layers=12,24] [--size=tiny]
                                [--policies=none,full,dots_saveable,...] [--memory_scan=both]

(a) compile: the MLM train step of `--size` (tiny: hidden 64) with `--layers` layers, scanned and
    unrolled, compiled from abstract arrays (nothing allocated); seconds of `lower` + `compile`.
(b) memory: BERT-large (24 layers, hidden 1024) at seq 512, batch `--batch`, per remat policy:
    XLA's `memory_analysis()` of the compiled step (nothing runs). peak = arguments (train state
    and batch) + temporaries; the outputs alias the donated state. --memory_scan says whether the
    memory rows are compiled scanned, unrolled or both.
Prints a table and, with --json, one JSON object per row.
"""
import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.train_step import _Vocab  # noqa: E402
from configs import bert, demo  # noqa: E402
from objectives import registry  # noqa: E402
from pretrain.training import optimizer as optimizer_lib, sharding  # noqa: E402
from pretrain.training import state as state_lib, step as step_lib  # noqa: E402


def compiled_step(config):
  """(the compiled train step of `config` from abstract arrays, lower + compile seconds of wall
  clock and of this process's CPU: the second is the steadier on a shared machine)."""
  d = config.data
  objective = registry.build(config, _Vocab(d.tokenizer.vocab_size))
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, 1000)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.axis_rules)
  target, shardings = state_lib.abstract_state(objective, tx, d.seq_len, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  batch = {f: jax.ShapeDtypeStruct((d.batch_size, d.seq_len), jnp.int32, sharding=batch_sharding)
           for f in objective.features}
  step = jax.jit(functools.partial(step_lib.train_step, objective=objective, tx=tx,
                                   schedule=schedule, accum_steps=1),
                 in_shardings=(shardings, batch_sharding, None), out_shardings=(shardings, None),
                 donate_argnums=0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    start, cpu = time.perf_counter(), time.process_time()
    compiled = step.lower(target, batch, jax.random.key(0)).compile()
  return compiled, (time.perf_counter() - start, time.process_time() - cpu)


def compile_rows(size, layer_counts, seq_len, batch):
  for layers in layer_counts:
    for scan in (False, True):
      c = demo.get_config(f"size={size},seq_len={seq_len},batch_size={batch},vocab_size=16000")
      c.model.update(num_layers=layers, scan_layers=scan)
      _, (wall, cpu) = compiled_step(c)
      yield {"bench": "compile", "size": size, "hidden": c.model.hidden_size, "layers": layers,
             "scan_layers": scan, "seq_len": seq_len, "batch": batch,
             "compile_s": round(wall, 2), "compile_cpu_s": round(cpu, 2)}


def memory_rows(policies, scans, seq_len, batch):
  for scan in scans:
    for policy in policies:
      c = bert.get_config(f"size=large,seq_len={seq_len},batch_size={batch}")
      c.model.update(scan_layers=scan, remat=policy, max_len=max(512, seq_len))
      compiled, (wall, cpu) = compiled_step(c)
      m = compiled.memory_analysis()
      yield {"bench": "memory", "model": "bert-large", "seq_len": seq_len, "batch": batch,
             "scan_layers": scan, "remat": policy,
             "argument_mib": round(m.argument_size_in_bytes / 2**20, 1),
             "temp_mib": round(m.temp_size_in_bytes / 2**20, 1),
             "peak_mib": round((m.argument_size_in_bytes + m.temp_size_in_bytes) / 2**20, 1),
             "compile_s": round(wall, 2), "compile_cpu_s": round(cpu, 2)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--part", default="compile,memory")
  parser.add_argument("--layers", default="12,24")
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--compile_seq_len", type=int, default=128)
  parser.add_argument("--compile_batch", type=int, default=8)
  parser.add_argument("--policies", default="none,full,dots_saveable,"
                      "dots_with_no_batch_dims_saveable")
  parser.add_argument("--memory_scan", choices=("scanned", "unrolled", "both"), default="scanned")
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--json", action="store_true")
  a = parser.parse_args()
  parts = a.part.split(",")
  if "compile" in parts:
    print(f"{'size':<6}{'layers':>7}{'scan':>7}{'compile s':>11}{'CPU s':>8}")
    for row in compile_rows(a.size, [int(n) for n in a.layers.split(",")], a.compile_seq_len,
                            a.compile_batch):
      print(f"{row['size']:<6}{row['layers']:>7}{str(row['scan_layers']):>7}"
            f"{row['compile_s']:>11.1f}{row['compile_cpu_s']:>8.1f}"
            + (f"  {json.dumps(row)}" if a.json else ""), flush=True)
  if "memory" in parts:
    scans = {"scanned": (True,), "unrolled": (False,), "both": (False, True)}[a.memory_scan]
    print(f"{'remat':<34}{'scan':>6}{'args MiB':>10}{'temp MiB':>10}{'peak MiB':>10}"
          f"{'vs none':>9}")
    base = {}
    for row in memory_rows(a.policies.split(","), scans, a.seq_len, a.batch):
      base.setdefault(row["scan_layers"], row["peak_mib"] if row["remat"] == "none" else None)
      ref = base[row["scan_layers"]]
      change = f"{row['peak_mib'] / ref - 1:+.0%}" if ref else ""
      print(f"{row['remat']:<34}{str(row['scan_layers']):>6}{row['argument_mib']:>10.0f}"
            f"{row['temp_mib']:>10.0f}{row['peak_mib']:>10.0f}{change:>9}"
            + (f"  {json.dumps(row)}" if a.json else ""), flush=True)


if __name__ == "__main__":
  main()
