"""Zero-shot code retrieval (held-out stdlib docstring -> function) of pretrained encoders vs BM25.

  # A table for existing exports or workdirs (path:cls or path:mean picks one pooler):
  python bench/retrieval.py --models=exports/demo,workdir/retromae:cls
  # MLM vs RetroMAE vs DupMAE pretrained at equal training FLOPs on the demo corpus, then the table:
  python bench/retrieval.py --pretrain --root=workdir/retrieval --mlm_steps=600 [--size=demo]

The task is `pretrain.data.code_tasks.docstring_retrieval`: every held-out function whose
docstring's first paragraph has at least 4 words is a query; the candidates are the code
(docstring removed) of all held-out functions (files pretraining never saw). Metrics: MRR@10 and
recall@10, ranks pessimistic on ties (`pretrain.retrieval`).

--pretrain trains configs/demo.py:whole_word=True (MLM), configs/dupmae.py:variant=retromae and
configs/dupmae.py:variant=dupmae in <root>/<name>, with everything but the objective equal (model,
data, batch, optimizer, schedule shape). Equal compute: each run gets the steps that give it the
training FLOPs of `--mlm_steps` MLM steps, per-step FLOPs read from XLA's cost analysis of the
lowered train step; the decoder (one layer plus the vocabulary projection at every position) and
DupMAE's all-position encoder logits make their steps 2-3x as expensive as MLM's at the demo size.
Every command is printed before it runs; rerunning resumes finished or interrupted runs.
"""
import argparse
import functools
import os
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pretrain import optimizer as optimizer_lib, retrieval, train  # noqa: E402
from pretrain.data import code_tasks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> config argument of pretrain.main (steps appended).
RUNS = {
    "mlm": "configs/demo.py:whole_word=True",
    "retromae": "configs/dupmae.py:variant=retromae",
    "dupmae": "configs/dupmae.py:variant=dupmae",
    # Contrastive (objectives/contrastive.py), mean pooling: Contriever crops, docstring pairs.
    "contriever": "configs/contriever.py",
    "code_pairs": "configs/code_pairs.py",
}


def load_config(spec):
  """The ConfigDict of "configs/x.py:arg" (as pretrain.main would build it)."""
  path, _, arg = spec.partition(":")
  module = types.ModuleType("config")
  with open(os.path.join(ROOT, path)) as f:
    exec(compile(f.read(), path, "exec"), module.__dict__)  # pylint: disable=exec-used
  return module.get_config(arg or None)


def step_flops(config):
  """FLOPs of one train step of `config` (XLA's cost analysis of the lowered step; no compile)."""
  vocab = config.data.tokenizer.vocab_size
  tokenizer = types.SimpleNamespace(vocab_size=vocab,
                                    word_start_table=lambda: np.zeros(vocab, bool))
  objective = train.make_objective(config, tokenizer)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  seq_len, batch_size = config.data.seq_len, config.data.batch_size
  state = jax.eval_shape(lambda r: nn.unbox(train.init_state(r, objective, tx, seq_len)),
                         jax.random.key(0))
  # Rows shaped like the objective's own (pair objectives have shorter query rows).
  batch = {f: jax.ShapeDtypeStruct((batch_size, *x.shape[1:]), jnp.int32)
           for f, x in train._example_batch(objective, seq_len).items()}  # pylint: disable=protected-access
  step = jax.jit(functools.partial(train.train_step, objective=objective, tx=tx,
                                   schedule=schedule, accum_steps=1))
  return float(step.lower(state, batch, jax.random.key(0)).cost_analysis()["flops"])


def run_specs(size, names=tuple(RUNS)):
  """{name: config argument} of the RUNS `names` (and mlm, the budget's unit) at model size
  `size` (configs/common.py MODEL_SIZES)."""
  return {name: RUNS[name] + ("," if ":" in RUNS[name] else ":") + f"size={size}"
          for name in dict.fromkeys(("mlm", *names))}


def equal_compute_steps(mlm_steps, size, names=tuple(RUNS)):
  """{name: (steps, FLOPs per step)} giving every run the FLOPs of `mlm_steps` MLM steps."""
  flops = {name: step_flops(load_config(spec)) for name, spec in run_specs(size, names).items()}
  budget = mlm_steps * flops["mlm"]
  return {name: (max(1, round(budget / f)), f) for name, f in flops.items()}


def run(*args):
  command = [sys.executable, *args]
  print("$ " + " ".join(command), flush=True)
  subprocess.run(command, cwd=ROOT, check=True)


def pretrain(root, mlm_steps, size, names, extra_flags):
  """Trains and exports the RUNS `names` at equal FLOPs; returns {name: export dir}."""
  plan, specs = equal_compute_steps(mlm_steps, size, names), run_specs(size, names)
  for name, (steps, flops) in plan.items():
    print(f"{name}: {flops / 1e9:.2f} GFLOP per step -> {steps} steps "
          f"({steps * flops / 1e12:.1f} TFLOP)", flush=True)
  exports = {}
  for name, (steps, _) in plan.items():
    workdir, out = os.path.join(root, name), os.path.join(root, name, "export")
    start = time.perf_counter()
    run("-m", "pretrain.main", f"--config={specs[name]},steps={steps}", f"--workdir={workdir}",
        *extra_flags)
    run("-m", "pretrain.export", f"--workdir={workdir}", f"--out={out}", "--overwrite")
    print(f"{name}: trained and exported in {time.perf_counter() - start:.0f} s", flush=True)
    exports[name] = out
  return exports


def markdown(results):
  lines = ["| model | MRR@10 | recall@10 | queries | candidates |", "|---|---|---|---|---|"]
  lines += [f"| {r.name} | {r.mrr_at_10:.3f} | {r.recall_at_10:.3f} | {r.num_queries} | "
            f"{r.num_candidates} |" for r in results]
  return "\n".join(lines)


def parse_model(spec):
  """"path" -> (path, every pooler); "path:cls" -> (path, ("cls",))."""
  path, _, pooler = spec.partition(":")
  return path, (pooler,) if pooler else retrieval.POOLERS


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="", help="comma-separated export dirs or workdirs, "
                      "each optionally :cls or :mean")
  parser.add_argument("--pretrain", action="store_true", help="pretrain MLM, RetroMAE, DupMAE "
                      "at equal FLOPs first, and evaluate their exports")
  parser.add_argument("--root", default="workdir/retrieval", help="--pretrain workdirs")
  parser.add_argument("--mlm_steps", type=int, default=600, help="--pretrain compute budget, "
                      "in MLM steps of the demo config")
  parser.add_argument("--size", default="demo", help="--pretrain model size (configs/common.py)")
  parser.add_argument("--runs", default=",".join(RUNS), help="--pretrain: which of " + ", ".join(RUNS))
  parser.add_argument("--max_len", type=int, default=128, help="tokens per text, [CLS] and "
                      "[SEP] included (the demo pretrains at 128)")
  parser.add_argument("--validation_fraction", type=float, default=0.05)
  parser.add_argument("--out", default="", help="also write the table to this markdown file")
  args, extra_flags = parser.parse_known_args()

  models = [parse_model(s) for s in filter(None, args.models.split(","))]
  if args.pretrain:
    names = [n for n in args.runs.split(",") if n]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
      parser.error(f"unknown --runs {unknown}; valid: {', '.join(RUNS)}")
    exports = pretrain(os.path.abspath(args.root), args.mlm_steps, args.size, names, extra_flags)
    models += [(path, retrieval.POOLERS) for path in exports.values()]
  queries, candidates, relevant = code_tasks.docstring_retrieval(args.validation_fraction)
  print(f"{len(queries)} queries, {len(candidates)} candidates", flush=True)
  results = [retrieval.evaluate_bm25(queries, candidates, relevant)]
  for path, poolers in models:
    name = os.path.relpath(os.path.abspath(path), ROOT)
    results += retrieval.evaluate(path, queries, candidates, relevant, poolers, name=name,
                                  max_len=args.max_len)
    print(markdown(results[-len(poolers):]), flush=True)
  table = markdown(results)
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  main()
