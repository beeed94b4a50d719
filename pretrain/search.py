"""Exact search over a corpus of embeddings, quantized embeddings, and ranking metrics.

`top_k(queries, corpus, k)` scores queries against the whole corpus on device, a block of queries
at a time (so a [Q, C] matrix never exists), and keeps each query's k best. `quantize` gives the
storage-compressed embeddings of the embedding papers and sentence-transformers'
`quantize_embeddings`: int8 (each dimension's range over the corpus cut into 256 buckets, 4x
smaller than float32) and binary (the sign of each dimension, 32x smaller, scored by the dot
product of +-1 vectors, i.e. D - 2 x Hamming distance). `metrics` scores ranked lists against each
query's set of relevant corpus ids: MRR@10, recall@k and nDCG@10 with binary relevance.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pretrain import retrieval
from pretrain.models import pooling

QUANTIZATIONS = ("float32", "int8", "binary")
BYTES_PER_DIM = {"float32": 4.0, "int8": 1.0, "binary": 1 / 8}
BLOCK = 256


@functools.partial(jax.jit, static_argnames=("k",))
def _block_top_k(q_BD, c_CD, *, k):
  return jax.lax.top_k(q_BD @ c_CD.T, k)


def top_k(queries_QD, corpus_CD, k: int, *, block: int = BLOCK, progress=None):
  """(scores [Q, k], corpus ids [Q, k]) of the k best dot products per query, best first; ties
  go to the lower corpus id. `progress(n)` is called after each block of n queries."""
  k = min(k, len(corpus_CD))
  corpus = jnp.asarray(corpus_CD, jnp.float32)
  scores, ids = np.zeros((len(queries_QD), k), np.float32), np.zeros((len(queries_QD), k), np.int64)
  for start in range(0, len(queries_QD), block):
    rows = np.asarray(queries_QD[start:start + block], np.float32)
    padded = np.zeros((block, rows.shape[1]), np.float32)  # One compile for every block.
    padded[:len(rows)] = rows
    s, i = _block_top_k(jnp.asarray(padded), corpus, k=k)
    scores[start:start + len(rows)], ids[start:start + len(rows)] = s[:len(rows)], i[:len(rows)]
    if progress is not None:
      progress(len(rows))
  return scores, ids


def ranked(scores_QC, k: int):
  """(scores [Q, k], ids [Q, k]) of the k best of each row of a full score matrix (BM25's), best
  first; ties go to the lower id, as in `top_k`."""
  ids = np.argsort(-np.asarray(scores_QC), axis=1, kind="stable")[:, :k]
  return np.take_along_axis(np.asarray(scores_QC), ids, 1), ids


def quantize(embeddings_ND, kind: str, calibration_MD=None) -> np.ndarray:
  """float32 values of the `kind` quantization of L2-normalised embeddings (see the module)."""
  if kind not in QUANTIZATIONS:
    raise ValueError(f"quantization {kind!r}; choose from {', '.join(QUANTIZATIONS)}.")
  x = pooling.l2_normalize(np.asarray(embeddings_ND, np.float64), xp=np)
  if kind == "float32":
    return x.astype(np.float32)
  if kind == "binary":
    return np.where(x > 0, 1.0, -1.0).astype(np.float32)
  cal = x if calibration_MD is None else pooling.l2_normalize(
      np.asarray(calibration_MD, np.float64), xp=np)
  low, high = cal.min(0), cal.max(0)
  steps = np.where(high > low, (high - low) / 255.0, 1.0)
  return (np.clip(np.round((x - low) / steps), 0, 255) - 128).astype(np.float32)


def embed(model: retrieval.EncoderBundle, texts, pooler: str, max_len: int) -> np.ndarray:
  return retrieval.embed(model, texts, pooler, max_len=min(max_len, model.config.max_len))


def metrics(ids_QK, relevant, ks=(1, 10, 100)) -> dict:
  """{"mrr@10", "ndcg@10", "recall@k" for k in ks} of ranked corpus ids against `relevant` (one
  set of corpus ids per query), averaged over queries; and "per_query_rr" for standard errors."""
  rr, ndcg, recall = [], [], {k: [] for k in ks}
  discounts = 1.0 / np.log2(np.arange(2, 12))
  for ranked, rel in zip(ids_QK, relevant):
    hits = np.isin(ranked, list(rel))
    first = int(np.argmax(hits)) if hits.any() else None
    rr.append(1.0 / (first + 1) if first is not None and first < 10 else 0.0)
    ideal = discounts[:min(len(rel), 10)].sum()
    ndcg.append(float((hits[:10] * discounts[:len(hits[:10])]).sum() / ideal))
    for k in ks:
      recall[k].append(hits[:k].sum() / len(rel))
  out = {"mrr@10": float(np.mean(rr)), "ndcg@10": float(np.mean(ndcg))}
  out.update({f"recall@{k}": float(np.mean(v)) for k, v in recall.items()})
  out["per_query_rr"] = rr
  return out


def corpus_of(rows, with_negatives: bool = True):
  """(corpus texts, relevant ids per row): every distinct positive (and negative) of the rows.

  A row's relevant set is every positive of its query, over all rows with that query text
  (sentence-transformers files repeat a query once per positive)."""
  index, corpus = {}, []

  def add(text):
    if text not in index:
      index[text] = len(corpus)
      corpus.append(text)
    return index[text]

  by_query = {}
  for row in rows:
    by_query.setdefault(row.query, set()).update(add(p) for p in row.pos)
  relevant = [by_query[row.query] for row in rows]
  if with_negatives:
    for row in rows:
      for n in row.neg:
        add(n)
  return corpus, relevant
