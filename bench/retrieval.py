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
data, batch, optimizer, schedule shape). Equal compute (bench/equal_compute.py): each run gets the
steps that give it the training FLOPs of `--mlm_steps` MLM steps. The decoder (one layer plus the
vocabulary projection at every position) and DupMAE's all-position encoder logits make their steps
2-3x as expensive as MLM's at the demo size.
Every command is printed before it runs; rerunning resumes finished or interrupted runs.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import equal_compute  # noqa: E402
from pretrain import retrieval  # noqa: E402
from pretrain.finetune import code_tasks  # noqa: E402
from pretrain.models import pooling  # noqa: E402

ROOT = equal_compute.ROOT
# name -> config argument of pretrain.main (steps appended).
RUNS = {
    "mlm": "configs/demo.py:whole_word=True",
    "retromae": "configs/dupmae.py:variant=retromae",
    "dupmae": "configs/dupmae.py:variant=dupmae",
    # Contrastive (objectives/contrastive.py), mean pooling: Contriever crops, docstring pairs.
    "contriever": "configs/contriever.py",
    "code_pairs": "configs/code_pairs.py",
}


def run_specs(size, names=tuple(RUNS)):
  """{name: config argument} of the RUNS `names` (and mlm, the budget's unit) at model size
  `size` (configs/common.py MODEL_SIZES)."""
  return {name: equal_compute.with_args(RUNS[name], size=size)
          for name in dict.fromkeys(("mlm", *names))}


def markdown(results):
  lines = ["| model | MRR@10 | recall@10 | queries | candidates |", "|---|---|---|---|---|"]
  lines += [f"| {r.name} | {r.mrr_at_10:.3f} | {r.recall_at_10:.3f} | {r.num_queries} | "
            f"{r.num_candidates} |" for r in results]
  return "\n".join(lines)


def print_table(table, out=""):
  """Prints a markdown table and, with `out`, writes it to that file too."""
  print(table, flush=True)
  if out:
    with open(out, "w") as f:
      f.write(table + "\n")


def parse_model(spec):
  """"path" -> (path, every pooler); "path:cls" -> (path, ("cls",))."""
  path, _, pooler = spec.partition(":")
  return path, (pooler,) if pooler else pooling.MODES


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
    specs = run_specs(args.size, names)
    plan = equal_compute.equal_compute_steps(specs, "mlm", args.mlm_steps)
    exports = equal_compute.pretrain(os.path.abspath(args.root), specs, plan, extra_flags)
    models += [(path, pooling.MODES) for path in exports.values()]
  queries, candidates, relevant = code_tasks.docstring_retrieval(args.validation_fraction)
  print(f"{len(queries)} queries, {len(candidates)} candidates", flush=True)
  results = [retrieval.evaluate_bm25(queries, candidates, relevant)]
  for path, poolers in models:
    name = os.path.relpath(os.path.abspath(path), ROOT)
    results += retrieval.evaluate(path, queries, candidates, relevant, poolers, name=name,
                                  max_len=args.max_len)
    print(markdown(results[-len(poolers):]), flush=True)
  print_table(markdown(results), args.out)


if __name__ == "__main__":
  main()
