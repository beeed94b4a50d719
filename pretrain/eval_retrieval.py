"""Retrieval evaluation of any model on any pair file, in float32 and quantized.

  python -m pretrain.eval_retrieval --model=exports/demo --pairs=test.jsonl [--bm25] \
      [--quantize=float32,int8,binary] [--pooler=mean] [--json=scores.json]

--model: a workdir, an export or a Hugging Face directory (comma-separated for several). The corpus
is every distinct positive and negative of --pairs (pretrain/data/pair_files.py), each query's
relevant set the positives of all its rows. Embeddings are --pooler (mean or cls) of the encoder's
final states with --query_prefix / --doc_prefix prepended; an export's trained projection or
latent pooler is not applied (pooled states only). Each model embeds queries and corpus once; every --quantize choice
then ranks the whole corpus exactly (pretrain/search.py: int8 per-dimension buckets calibrated on
the corpus, binary signs). Printed: MRR@10 with its standard error, nDCG@10, recall@1/10/100 and
the bytes per embedding; --bm25 adds BM25's row. --json writes the same rows.
"""
from __future__ import annotations

import json
import os

from absl import flags

from objectives.checks import ConfigError
from pretrain import cli, console, retrieval, search
from pretrain.data import pair_files
from pretrain.finetune import bench_scores
from pretrain.models import pooling

HEADER = ("model", "quantization", "bytes", "MRR@10", "s.e.", "nDCG@10", "R@1", "R@10", "R@100")


def parse(f):
  models = [m for m in (f.model or "").split(",") if m]
  kinds = [q for q in f.quantize.split(",") if q]
  if not models and not f.bm25:
    raise ConfigError("give --model=<dir>[,<dir>...] and/or --bm25.")
  bad = [q for q in kinds if q not in search.QUANTIZATIONS]
  if bad or not kinds:
    raise ConfigError(f"--quantize={f.quantize!r}; choose from {', '.join(search.QUANTIZATIONS)}.")
  pooling.check(f.pooler, "--pooler")
  for m in models:
    if not os.path.isdir(m):
      raise FileNotFoundError(f"--model={m}: no such directory.")
  return models, kinds


def row(name, kind, dim, ids, relevant) -> dict:
  m = search.metrics(ids, relevant)
  se = bench_scores.mean_se(m.pop("per_query_rr"))
  return {"model": name, "quantization": kind,
          "bytes": None if dim is None else dim * search.BYTES_PER_DIM[kind], "mrr@10_se": se, **m}


def evaluate(models, kinds, pairs: str, *, bm25: bool = False, pooler: str = "mean",
             max_len: int = 128, fields: str = "", query_prefix: str = "",
             doc_prefix: str = "") -> list[dict]:
  rows = pair_files.read(pairs, pair_files.Fields.parse(fields), query_prefix, doc_prefix)
  corpus, relevant = search.corpus_of(rows)
  queries = [r.query for r in rows]
  out = []
  for path in models:
    model = retrieval.load_encoder(path)
    q, c = (search.embed(model, texts, pooler, max_len) for texts in (queries, corpus))
    for kind in kinds:
      _, ids = search.top_k(search.quantize(q, kind, c), search.quantize(c, kind), 100)
      out.append(row(path, kind, q.shape[1], ids, relevant))
  if bm25:
    _, ids = search.ranked(retrieval.bm25_scores(queries, corpus), 100)
    out.append(row("BM25", "-", None, ids, relevant))
  return out


def table(rows) -> str:
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  for r in rows:
    size = "-" if r["bytes"] is None else f"{r['bytes']:g}"
    lines.append(f"| {r['model']} | {r['quantization']} | {size} | {r['mrr@10']:.3f} | "
                 f"{r['mrr@10_se']:.3f} | {r['ndcg@10']:.3f} | {r['recall@1']:.3f} | "
                 f"{r['recall@10']:.3f} | {r['recall@100']:.3f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  console.quiet(f["verbosity"].present)
  models, kinds = parse(f)
  if not f.pairs:
    raise ConfigError("--pairs is required: the pair file(s) to evaluate on.")
  rows = evaluate(models, kinds, f.pairs, bm25=f.bm25, pooler=f.pooler, max_len=f.max_len,
                  fields=f.pair_fields, query_prefix=f.query_prefix, doc_prefix=f.doc_prefix)
  print(table(rows), flush=True)
  if f.json:
    with open(f.json, "w", encoding="utf-8") as out:
      json.dump({"pairs": f.pairs, "pooler": f.pooler, "rows": rows}, out, indent=2)


def define_flags():
  flags.DEFINE_string("model", "", "Workdir(s), export(s) or Hugging Face dir(s), comma-separated.")
  flags.DEFINE_string("pairs", None, "Pair file(s) with queries and positives (globs).")
  flags.DEFINE_string("pair_fields", "", "query,positive[,negatives] field names ('': detect).")
  flags.DEFINE_bool("bm25", False, "Add BM25's row.")
  flags.DEFINE_string("quantize", "float32,int8,binary", "Embedding quantizations to score.")
  flags.DEFINE_string("pooler", "mean", "mean or cls.")
  flags.DEFINE_string("query_prefix", "", "Prepended to every query (E5's 'query: ').")
  flags.DEFINE_string("doc_prefix", "", "Prepended to every corpus text.")
  flags.DEFINE_integer("max_len", 128, "Tokens per text.")
  flags.DEFINE_string("json", "", "Also write the rows to this JSON file.")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
