"""Contrastive training from random init against the same after MLM pretraining, on held-out retrieval.

  python bench/contrastive_init.py --root=workdir/contrastive_init --steps=200 \
      [--views=crop,ict,ccp,docstring] [--mlm=<a configs/cpu_recipe.py workdir>]

1. The MLM encoder: `--mlm` if given, else configs/cpu_recipe.py (what `make demo` trains: the
   ModernBERT-class demo encoder, 1,200 steps) in <root>/mlm.
2. Per view, `--steps` steps of its recipe at the same size and architecture (arch=modern), once
   from random init and once with `--config.init_from` the MLM run's export:
     crop       configs/contriever.py            Contriever's random crops, InfoNCE
     ict        configs/contriever.py:view=ict   ORQA's inverse cloze task ([CLS], projection)
     ccp        configs/contriever.py:view=ccp,loss=moco   CCP with the memory bank and batch norm
     docstring  configs/code_pairs.py            docstring <-> code pairs
3. The held-out docstring -> code retrieval (`bench/retrieval.py`'s task) of BM25, of the MLM
   encoder and of every run, with its view's pooler (ICT's projection is not applied: the
   pooled states are scored), and each run's training wall and CPU minutes.
Every command is printed before it runs; a rerun resumes or skips what is done.
"""
import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import equal_compute  # noqa: E402
from bench.retrieval import print_table  # noqa: E402
from pretrain import retrieval  # noqa: E402
from pretrain.finetune import code_tasks  # noqa: E402

# view -> (config argument, pooler scored)
VIEWS = {
    "crop": ("configs/contriever.py:view=crop", "mean"),
    "ict": ("configs/contriever.py:view=ict", "cls"),
    "ccp": ("configs/contriever.py:view=ccp,loss=moco", "mean"),
    "docstring": ("configs/code_pairs.py:view=docstring", "mean"),
}


def _child_cpu_s():
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def train(spec, workdir, extra):
  """Runs (or resumes) one pretrain.main run; its {"wall_s", "cpu_s"} (CPU seconds of all cores,
  steadier than wall time on a shared machine), kept beside it for reruns."""
  timing = os.path.join(workdir, "timing.json")
  if os.path.exists(timing):
    with open(timing) as f:
      return json.load(f)
  wall, cpu = time.perf_counter(), _child_cpu_s()
  equal_compute.run("-m", "pretrain.main", f"--config={spec}", f"--workdir={workdir}", *extra)
  spent = {"wall_s": time.perf_counter() - wall, "cpu_s": _child_cpu_s() - cpu}
  with open(timing, "w") as f:
    json.dump(spent, f)
  return spent


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="workdir/contrastive_init")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--views", default=",".join(VIEWS))
  parser.add_argument("--mlm", default="", help="an MLM workdir of configs/cpu_recipe.py's shape")
  parser.add_argument("--max_len", type=int, default=128, help="tokens per text when scoring")
  parser.add_argument("--out", default="", help="also write the table to this markdown file")
  args, extra = parser.parse_known_args()
  views = [v for v in args.views.split(",") if v]
  unknown = sorted(set(views) - set(VIEWS))
  if unknown:
    parser.error(f"unknown --views {unknown}; valid: {', '.join(VIEWS)}")
  root = os.path.abspath(args.root)
  os.makedirs(root, exist_ok=True)
  mlm = os.path.abspath(args.mlm) if args.mlm else os.path.join(root, "mlm")
  mlm_spent = None if args.mlm else train("configs/cpu_recipe.py", mlm, extra)
  # A workdir's init_from must match its objective; the export carries the encoder alone.
  mlm_export = os.path.join(mlm, "export")
  if not os.path.isdir(mlm_export):
    equal_compute.run("-m", "pretrain.export", f"--workdir={mlm}", f"--out={mlm_export}")
  # (name, init, pooler, workdir, {"wall_s", "cpu_s"} of its training or None)
  scored = [("MLM (configs/cpu_recipe.py)", "-", p, mlm, mlm_spent) for p in ("mean", "cls")]
  for view in views:
    spec, pooler = VIEWS[view]
    spec = equal_compute.with_args(spec, arch="modern", steps=args.steps)
    for init, init_flags in (("random", []), ("after MLM", [f"--config.init_from={mlm_export}"])):
      workdir = os.path.join(root, f"{view}_{'mlm' if init_flags else 'random'}")
      scored.append((f"{view}, {args.steps} steps", init, pooler, workdir,
                     train(spec, workdir, [*init_flags, *extra])))

  queries, candidates, relevant = code_tasks.docstring_retrieval()
  bm25 = retrieval.evaluate_bm25(queries, candidates, relevant)
  lines = ["| model | init | pooler | MRR@10 | recall@10 | training wall / CPU min |",
           "|---|---|---|---|---|---|",
           f"| BM25 | - | - | {bm25.mrr_at_10:.3f} | {bm25.recall_at_10:.3f} | - |"]
  for name, init, pooler, workdir, spent in scored:
    r, = retrieval.evaluate(workdir, queries, candidates, relevant, (pooler,), name=name,
                            max_len=args.max_len)
    minutes = "-" if spent is None else f"{spent['wall_s'] / 60:.1f} / {spent['cpu_s'] / 60:.1f}"
    lines.append(f"| {name} | {init} | {pooler} | {r.mrr_at_10:.3f} | {r.recall_at_10:.3f} | "
                 f"{minutes} |")
    print(lines[-1], flush=True)
  print_table("\n".join(lines), args.out)


if __name__ == "__main__":
  main()
