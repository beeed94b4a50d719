"""Pretraining runs that differ only in their objective, each given the same training FLOPs.

Shared by the comparisons in bench/ (bench/retrieval.py, bench/downstream.py). A run is a config
argument of pretrain.main ("configs/demo.py:objective=electra"); the budget is `unit_steps` steps
of the run named `unit`, and every other run gets the number of steps that spends the same FLOPs.
Per-step FLOPs come from XLA's cost analysis of the lowered train step (nothing is compiled), so a
generator, a decoder or an all-position vocabulary projection is counted as it runs. Every
command is printed before it runs; rerunning resumes finished or interrupted runs.
"""
import functools
import os
import subprocess
import sys
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pretrain.training import optimizer as optimizer_lib
from objectives import registry
from pretrain.training import state as state_lib
from pretrain.training import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec):
  """The ConfigDict of "configs/x.py:arg" (as pretrain.main would build it)."""
  path, _, arg = spec.partition(":")
  module = types.ModuleType("config")
  with open(os.path.join(ROOT, path)) as f:
    exec(compile(f.read(), path, "exec"), module.__dict__)  # pylint: disable=exec-used
  return module.get_config(arg or None)


def with_args(spec, **args):
  """`spec` with key=value config arguments appended."""
  extra = ",".join(f"{k}={v}" for k, v in args.items())
  return spec + ("," if ":" in spec else ":") + extra if extra else spec


def step_flops(config):
  """FLOPs of one train step of `config` (XLA's cost analysis of the lowered step; no compile)."""
  vocab = config.data.tokenizer.vocab_size
  tokenizer = types.SimpleNamespace(vocab_size=vocab,
                                    word_start_table=lambda: np.zeros(vocab, bool))
  objective = registry.build(config, tokenizer)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  seq_len, batch_size = config.data.seq_len, config.data.batch_size
  state = jax.eval_shape(lambda r: nn.unbox(state_lib.init_state(r, objective, tx, seq_len)),
                         jax.random.key(0))
  # Rows shaped like the objective's own (pair objectives have shorter query rows).
  batch = {f: jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), jnp.int32)
           for f, x in objective.example_batch(seq_len).items()}  # pylint: disable=protected-access
  step = jax.jit(functools.partial(step_lib.train_step, objective=objective, tx=tx,
                                   schedule=schedule, accum_steps=1))
  return float(step.lower(state, batch, jax.random.key(0)).cost_analysis()["flops"])


def equal_compute_steps(specs, unit, unit_steps):
  """{name: (steps, FLOPs per step)} giving every run of `specs` ({name: config argument}) the
  FLOPs of `unit_steps` steps of `specs[unit]`."""
  flops = {name: step_flops(load_config(spec)) for name, spec in specs.items()}
  budget = unit_steps * flops[unit]
  return {name: (max(1, round(budget / f)), f) for name, f in flops.items()}


def run(*args):
  command = [sys.executable, *args]
  print("$ " + " ".join(command), flush=True)
  subprocess.run(command, cwd=ROOT, check=True)


def pretrain(root, specs, plan, extra_flags=()):
  """Trains and exports every run of `specs` for the steps of `plan` (`equal_compute_steps`) into
  <root>/<name>; returns {name: export dir}."""
  for name, (steps, flops) in plan.items():
    print(f"{name}: {flops / 1e9:.2f} GFLOP per step -> {steps} steps "
          f"({steps * flops / 1e12:.1f} TFLOP)", flush=True)
  exports = {}
  for name, (steps, _) in plan.items():
    workdir, out = os.path.join(root, name), os.path.join(root, name, "export")
    start = time.perf_counter()
    run("-m", "pretrain.main", f"--config={with_args(specs[name], steps=steps)}",
        f"--workdir={workdir}", *extra_flags)
    run("-m", "pretrain.export", f"--workdir={workdir}", f"--out={out}", "--overwrite")
    print(f"{name}: trained and exported in {time.perf_counter() - start:.0f} s", flush=True)
    exports[name] = out
  return exports
