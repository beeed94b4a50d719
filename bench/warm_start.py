"""Continued training of all-MiniLM-L6-v2 on the corpus's code pairs, scored on held-out retrieval.

  python bench/warm_start.py --root=workdir/warm_start --steps=200 [--seeds=0,1,2] \
      [--variants=in-batch,negatives,guide] [--temperature=0.05] [--out=table.md]

1. <root>/pairs.jsonl: every documented function of the pretraining train files as a
   FlagEmbedding row {"query": first docstring paragraph, "pos": [code without the docstring]}
   (the held-out benchmark's extraction, pretrain/finetune/code_tasks.py, on the other split).
2. <root>/triplets.jsonl: `python -m pretrain.mine` with BM25 (DPR's hard negatives; --mining=minilm
   scores with all-MiniLM-L6-v2 itself), `--num_negatives` of the candidates ranked in
   [range_min, range_max) that score at least 5% below the positive (sentence-transformers'
   mine_hard_negatives and its false-negative margin).
3. One run per variant and seed of configs/pair_files.py:base=minilm (learning rate 2e-5, linear
   warmup over a tenth of the steps, then linear decay; batch 32; mean pooling, cosine scores):
     in-batch   the pair file, in-batch negatives only;
     negatives  the triplet file, each query's mined negatives next to the in-batch ones;
     guide      the triplet file with GISTEmbed's guide (MiniLM frozen masks false negatives).
   Every variant scores at --temperature (0.05 = sentence-transformers' scale 20, the one
   all-MiniLM-L6-v2 was trained at).
4. The held-out docstring -> code retrieval (every held-out function a candidate; `bench/retrieval.py`'s
   task): MRR@10 and recall@10 of BM25, of MiniLM as it is, and of every run, with the mean and
   standard deviation over seeds and each run's gain over MiniLM with the standard error of the
   per-query paired difference.
Every command is printed before it runs; a rerun resumes or skips what is done.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import equal_compute  # noqa: E402
from bench.retrieval import print_table  # noqa: E402
from pretrain import retrieval  # noqa: E402
from pretrain.data import python_code  # noqa: E402
from pretrain.finetune import bench_scores, code_tasks  # noqa: E402

ROOT = equal_compute.ROOT
# variant -> (config argument of configs/pair_files.py, which file it trains on)
VARIANTS = {
    "in-batch": ("negatives=0", "pairs"),
    "negatives": ("negatives={k}", "triplets"),
    "guide": ("negatives={k},guide=True", "triplets"),
}


def write_pairs(path):
  files = python_code.heldout_files("train")
  rows = [{"query": q, "pos": [code]}
          for q, code in code_tasks.documented(python_code.function_pairs(files)) if code.strip()]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)
  print(f"{path}: {len(rows)} pairs from {len(files)} train files", flush=True)


def per_query_rr(model, task, max_len):
  """Reciprocal rank at 10 of every held-out query (mean pooling, cosine)."""
  queries, candidates, relevant = task
  model = retrieval.load_encoder(model)
  q = retrieval.embed(model, queries, "mean", max_len=max_len)
  c = retrieval.embed(model, candidates, "mean", max_len=max_len)
  r = retrieval.ranks(retrieval.cosine_scores(q, c), relevant)
  return bench_scores.reciprocal_ranks(r), r <= 10


def summary(name, scores, base_rr):
  """A markdown row: mean ± std over seeds of MRR@10 and R@10, and the paired gain over MiniLM."""
  mrr = [float(rr.mean()) for rr, _ in scores]
  rec = [float(hit.mean()) for _, hit in scores]
  gain = np.mean([rr - base_rr for rr, _ in scores], axis=0)  # per query, averaged over seeds
  se = bench_scores.mean_se(gain)

  def cell(v):
    return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
  return f"| {name} | {len(scores)} | {cell(mrr)} | {cell(rec)} | {gain.mean():+.3f} ± {se:.3f} |"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="workdir/warm_start")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--seeds", default="0", help="comma-separated seeds of every variant")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--temperature", type=float, default=0.05)
  parser.add_argument("--mining", default="bm25", choices=("bm25", "minilm"))
  parser.add_argument("--num_negatives", type=int, default=1)
  parser.add_argument("--range_min", type=int, default=0)
  parser.add_argument("--range_max", type=int, default=50)
  parser.add_argument("--max_len", type=int, default=128, help="tokens per text when scoring")
  parser.add_argument("--out", default="", help="also write the table to this markdown file")
  args, extra_flags = parser.parse_known_args()
  variants = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    parser.error(f"unknown --variants {unknown}; valid: {', '.join(VARIANTS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  from configs import code_pairs  # pylint: disable=import-outside-toplevel
  minilm = code_pairs.minilm_dir()
  root = os.path.abspath(args.root)
  os.makedirs(root, exist_ok=True)
  files = {"pairs": os.path.join(root, "pairs.jsonl"), "triplets": os.path.join(root, "triplets.jsonl")}
  if not os.path.exists(files["pairs"]):
    write_pairs(files["pairs"])
  if any(VARIANTS[v][1] == "triplets" for v in variants) and not os.path.exists(files["triplets"]):
    equal_compute.run("-m", "pretrain.mine", f"--pairs={files['pairs']}", f"--out={files['triplets']}",
                      "--bm25" if args.mining == "bm25" else f"--model={minilm}",
                      f"--num_negatives={args.num_negatives}",
                      f"--range_min={args.range_min}", f"--range_max={args.range_max}",
                      "--relative_margin=0.05", "--sampling=top")
  runs = {}
  for v in variants:
    arg, data = VARIANTS[v]
    for seed in seeds:
      workdir = os.path.join(root, f"{v}_seed{seed}")
      spec = (f"configs/pair_files.py:base=minilm,steps={args.steps},"
              f"temperature={args.temperature}," + arg.format(k=args.num_negatives))
      equal_compute.run("-m", "pretrain.main", f"--config={spec}", f"--workdir={workdir}",
                        f"--config.data.paths={files[data]}", f"--config.seed={seed}",
                        f"--config.data.seed={seed}", *extra_flags)
      runs.setdefault(v, []).append(workdir)

  task = code_tasks.docstring_retrieval()
  print(f"{len(task[0])} queries, {len(task[1])} candidates", flush=True)
  bm25 = retrieval.evaluate_bm25(*task)
  base = per_query_rr(minilm, task, args.max_len)
  lines = ["| model | runs | MRR@10 | recall@10 | gain over MiniLM (MRR@10, paired s.e.) |",
           "|---|---|---|---|---|",
           f"| BM25 | - | {bm25.mrr_at_10:.3f} | {bm25.recall_at_10:.3f} | - |",
           summary("all-MiniLM-L6-v2 as it is", [base], base[0])]
  for v, workdirs in runs.items():
    lines.append(summary(f"+ {args.steps} steps, {v}", [per_query_rr(w, task, args.max_len)
                                                         for w in workdirs], base[0]))
    print(lines[-1], flush=True)
  print_table("\n".join(lines), args.out)


if __name__ == "__main__":
  main()
