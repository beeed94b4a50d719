"""Hard-negative mining: pair rows in, triplet rows out (sentence-transformers' mine_hard_negatives).

  python -m pretrain.mine --pairs=pairs.jsonl --out=triplets.jsonl --bm25 --num_negatives=5
  python -m pretrain.mine --pairs=pairs.jsonl --out=triplets.jsonl --model=exports/demo \
      --range_min=10 --range_max=100 --relative_margin=0.05 --sampling=random --seed=0

--pairs is any pair file pretrain/data/pair_files.py reads; the corpus is every distinct positive
(and given negative) of it. Every query's candidates come from BM25 (bm25s over code-aware terms)
or from a dense model (any workdir, export or Hugging Face directory; cosine of --pooler
embeddings of the encoder's final states, with --query_prefix / --doc_prefix prepended; a trained
projection or latent pooler of an export is not applied; exact search on device in blocks of
queries). A query's positives are all of its rows' positives. A candidate is kept when it is not one
of the query's positives, ranks in [--range_min, --range_max) among the others, and scores below
the positive's (its best positive) by --margin (absolute: score <= positive - margin) or
--relative_margin (score <= positive x (1 - margin)): the false-negative control of
sentence-transformers. Of those, --num_negatives are taken: the best (--sampling=top) or drawn
(--sampling=random, seeded per row, so a rerun writes the same file). The output is FlagEmbedding's
JSONL with the scores: {"query", "pos", "neg", "pos_score", "neg_scores"}; rows that keep no
negative are written with "neg": [] and counted.
"""
from __future__ import annotations

import json
import os

import numpy as np
import tqdm
from absl import flags

from objectives.checks import ConfigError
from pretrain import cli, console, retrieval, search
from pretrain.data import pair_files

SAMPLINGS = ("top", "random")


def check_flags(f) -> None:
  if not f.pairs or not f.out:
    raise ConfigError("--pairs and --out are required: the pair file to mine and the triplet "
                      "file to write.")
  if bool(f.model) == f.bm25:
    raise ConfigError("give exactly one of --model=<workdir | export | HF dir> and --bm25.")
  if f.sampling not in SAMPLINGS:
    raise ConfigError(f"--sampling={f.sampling!r}; choose from {', '.join(SAMPLINGS)}.")
  if not 0 <= f.range_min < f.range_max or f.num_negatives < 1:
    raise ConfigError(f"--range_min={f.range_min} --range_max={f.range_max} "
                      f"--num_negatives={f.num_negatives}: need 0 <= range_min < range_max and "
                      "num_negatives >= 1.")
  if f.margin is not None and f.relative_margin is not None:
    raise ConfigError("give at most one of --margin and --relative_margin.")
  if os.path.exists(f.out) and not f.overwrite:
    raise FileExistsError(f"--out={f.out} exists; pass --overwrite to replace it.")
  parent = os.path.dirname(os.path.abspath(f.out))
  if not os.path.isdir(parent):
    raise FileNotFoundError(f"--out={f.out}: the directory {parent} does not exist.")
  if f.model and not os.path.isdir(f.model):
    raise FileNotFoundError(f"--model={f.model}: no such directory.")


def candidates(rows, corpus, relevant, f):
  """(scores [Q, K], corpus ids [Q, K]) of the best K = range_max + positives per query, and
  each query's best positive score."""
  k = min(len(corpus), f.range_max + max(len(r.pos) for r in rows))
  queries = [r.query for r in rows]
  bar = tqdm.tqdm(total=len(rows), desc="scoring queries", unit="query")
  if f.bm25:
    scores = retrieval.bm25_scores(queries, corpus)
    bar.update(len(rows))
    positive = [max(scores[r, i] for i in rel) for r, rel in enumerate(relevant)]
    return (*search.ranked(scores, k), np.asarray(positive))
  model = retrieval.load_encoder(f.model)
  q = search.quantize(search.embed(model, [f.query_prefix + t for t in queries], f.pooler,
                                   f.max_len), "float32")
  c = search.quantize(search.embed(model, [f.doc_prefix + t for t in corpus], f.pooler,
                                   f.max_len), "float32")
  positive = [max(float(q[r] @ c[i]) for i in rel) for r, rel in enumerate(relevant)]
  return (*search.top_k(q, c, k, progress=bar.update), np.asarray(positive))


def keep(relevant, scores, ids, positive, f, seed: int):
  """The negatives of one row: ranked, filtered by range and margin, then sampled."""
  own = np.isin(ids, list(relevant))
  ranked = [(float(s), int(i)) for s, i in zip(scores[~own], ids[~own])]
  ranked = ranked[f.range_min:f.range_max]
  if f.margin is not None:
    ranked = [(s, i) for s, i in ranked if s <= positive - f.margin]
  elif f.relative_margin is not None:
    ranked = [(s, i) for s, i in ranked if s <= positive * (1 - f.relative_margin)]
  if f.sampling == "random" and len(ranked) > f.num_negatives:
    picked = np.sort(np.random.default_rng([seed, f.seed]).permutation(len(ranked))[
        :f.num_negatives])
    ranked = [ranked[j] for j in picked]
  return ranked[:f.num_negatives]


def mine(f) -> dict:
  rows = pair_files.read(f.pairs, pair_files.Fields.parse(f.pair_fields))
  corpus, relevant = search.corpus_of(rows)
  scores, ids, positives = candidates(rows, corpus, relevant, f)
  empty = 0
  with open(f.out + ".tmp", "w", encoding="utf-8") as out:
    for r, (row, rel) in enumerate(zip(rows, relevant)):
      positive = float(positives[r])
      negs = keep(rel, scores[r], ids[r], positive, f, r)
      empty += not negs
      out.write(json.dumps({"query": row.query, "pos": list(row.pos),
                            "neg": [corpus[i] for _, i in negs], "pos_score": positive,
                            "neg_scores": [s for s, _ in negs]}) + "\n")
  os.replace(f.out + ".tmp", f.out)
  print(f"Wrote {len(rows)} rows to {f.out} ({len(corpus)} corpus texts; {empty} rows kept no "
        "negative).", flush=True)
  return {"rows": len(rows), "corpus": len(corpus), "without_negatives": empty}


def main(argv):
  del argv
  f = flags.FLAGS
  console.quiet(f["verbosity"].present)
  check_flags(f)
  mine(f)


def define_flags():
  flags.DEFINE_string("pairs", None, "Pair file(s) to mine (globs, comma-separated).")
  flags.DEFINE_string("out", None, "The triplet JSONL to write.")
  flags.DEFINE_string("pair_fields", "", "query,positive[,negatives] field names ('': detect).")
  flags.DEFINE_string("model", "", "A workdir, export or Hugging Face directory to score with.")
  flags.DEFINE_bool("bm25", False, "Score with BM25 instead of a model.")
  flags.DEFINE_integer("num_negatives", 5, "Negatives kept per query.")
  flags.DEFINE_integer("range_min", 0, "Skip the best range_min candidates (likely positives).")
  flags.DEFINE_integer("range_max", 100, "Consider candidates ranked below range_max.")
  flags.DEFINE_float("margin", None, "Keep scores <= positive - margin.")
  flags.DEFINE_float("relative_margin", None, "Keep scores <= positive x (1 - margin).")
  flags.DEFINE_string("sampling", "top", "top: the best kept; random: drawn (seeded).")
  flags.DEFINE_integer("seed", 0, "Seed of --sampling=random.")
  flags.DEFINE_string("pooler", "mean", "Dense pooling: mean or cls.")
  flags.DEFINE_string("query_prefix", "", "Prepended to each query for dense scoring (E5's "
                      "'query: '); the output keeps the texts as they are.")
  flags.DEFINE_string("doc_prefix", "", "Prepended to each corpus text for dense scoring.")
  flags.DEFINE_integer("max_len", 128, "Tokens per text for dense scoring.")
  flags.DEFINE_bool("overwrite", False, "Replace --out when it exists.")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
