"""Zero-shot retrieval with a pretrained encoder: embed, score, rank; BM25 as the lexical baseline.

  from pretrain import retrieval
  from pretrain.finetune import code_tasks
  queries, candidates, relevant = code_tasks.docstring_retrieval()
  retrieval.evaluate(retrieval.load_encoder("exports/demo"), queries, candidates, relevant)

No fine-tuning: a text is "[CLS] its first max_len - 2 tokens [SEP]" (one text per row, the
pretraining input format), embedded by the [CLS] state (`pooler="cls"`, what RetroMAE and DupMAE
train as the sentence embedding) or the mean over its tokens ([CLS] and [SEP] included, as
sentence-transformers' mean pooling), and candidates are ranked by cosine similarity (the raw
states of an encoder pretrained without a contrastive loss have no meaningful norm).
Ranks are pessimistic on ties (a candidate scoring equal to the relevant one ranks above it), which
matters for BM25: a query sharing no term with its function scores 0 against all of them.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pretrain.interop import load
from pretrain.models import encoder as enc, pooling


class EncoderBundle(NamedTuple):
  """What `embed` needs: encoder parameters, their config and the tokenizer."""
  params: Any
  config: enc.EncoderConfig
  tokenizer: Any


def load_encoder(path: str, step: int | None = None) -> EncoderBundle:
  """`pretrain.interop.load.load_encoder(path, step)` (a workdir, an export or a Hugging Face
  directory) with its tokenizer loaded."""
  pretrained = load.load_encoder(path, step)
  return EncoderBundle(pretrained.encoder, pretrained.config, pretrained.tokenizer())


def tokenize(tokenizer, texts, max_len):
  """int32 [N, max_len] ids "[CLS] text [SEP]" (truncated), [PAD]-padded, and the lengths [N]."""
  ids = np.full((len(texts), max_len), tokenizer.pad_id, np.int32)
  lengths = np.zeros(len(texts), np.int32)
  for i, pieces in enumerate(tokenizer.encode_batch(list(texts))):
    row = [tokenizer.cls_id, *pieces[:max_len - 2], tokenizer.sep_id]
    ids[i, :len(row)], lengths[i] = row, len(row)
  return ids, lengths


@functools.partial(jax.jit, static_argnames=("config",))
def _embed_batch(params, ids_BL, lengths_B, *, config):
  """{pooler: [B, H] float32} embeddings of one padded batch."""
  segment_ids_BL = (jnp.arange(ids_BL.shape[1]) < lengths_B[:, None]).astype(jnp.int32)
  positions_BL = jnp.broadcast_to(jnp.arange(ids_BL.shape[1]), ids_BL.shape)
  hidden_BLH = enc.Encoder(config).apply({"params": params}, ids_BL, segment_ids_BL,
                                         positions_BL).astype(jnp.float32)
  return {mode: pooling.pool(hidden_BLH, segment_ids_BL, mode) for mode in pooling.MODES}


def embed_all(model: EncoderBundle | str, texts, *, max_len=128, batch_size=64):
  """{pooler: float32 [N, H]} for every mode of `pooling.MODES`, from one encoder pass.

  Texts are sorted by length and each batch is cut to its longest row rounded up to a multiple of
  16, so short queries cost little and only a few shapes compile.
  """
  model = load_encoder(model) if isinstance(model, str) else model
  if not 3 <= max_len <= model.config.max_len:
    raise ValueError(f"max_len={max_len} must be in [3, {model.config.max_len}] (the encoder's "
                     f"position embeddings).")
  params = jax.tree.map(jnp.asarray, model.params)
  ids, lengths = tokenize(model.tokenizer, texts, max_len)
  order = np.argsort(lengths, kind="stable")
  out = {p: np.zeros((len(texts), model.config.hidden_size), np.float32) for p in pooling.MODES}
  for start in range(0, len(texts), batch_size):
    rows = order[start:start + batch_size]
    width = min(max_len, -(-int(lengths[rows].max()) // 16) * 16)
    batch = np.zeros((batch_size, width), np.int32)  # Fixed batch size: one compile per width.
    batch[:len(rows)] = ids[rows, :width]
    batch_lengths = np.zeros(batch_size, np.int32)
    batch_lengths[:len(rows)] = lengths[rows]
    for pooler, values in _embed_batch(params, batch, batch_lengths, config=model.config).items():
      out[pooler][rows] = np.asarray(values)[:len(rows)]
  return out


def embed(model: EncoderBundle | str, texts, pooler="cls", *, max_len=128, batch_size=64):
  """float32 [N, H] embeddings of `texts` in input order; `model` is an `EncoderBundle` or a path
  for `load_encoder`; pooler "cls" (the final [CLS] state) or "mean" (over the text's tokens)."""
  pooling.check(pooler, "pooler")
  return embed_all(model, texts, max_len=max_len, batch_size=batch_size)[pooler]


def cosine_scores(queries_QH, candidates_CH):
  """[Q, C] cosine similarities, in float64: the states of a barely trained encoder can be so
  alike that float32 cosines tie, and ties rank pessimistically."""
  q, c = np.asarray(queries_QH, np.float64), np.asarray(candidates_CH, np.float64)
  return pooling.l2_normalize(q, xp=np) @ pooling.l2_normalize(c, xp=np).T


def ranks(scores_QC, relevant_Q):
  """1-based rank of each query's relevant candidate; ties count against it (pessimistic)."""
  scores_QC = np.asarray(scores_QC)
  own = scores_QC[np.arange(len(scores_QC)), np.asarray(relevant_Q)]
  return np.sum(scores_QC >= own[:, None], axis=1)


def mrr_at_k(scores_QC, relevant_Q, k=10):
  """Mean reciprocal rank of the relevant candidate, 0 for ranks beyond k."""
  r = ranks(scores_QC, relevant_Q)
  return float(np.mean(np.where(r <= k, 1.0 / r, 0.0)))


def recall_at_k(scores_QC, relevant_Q, k=10):
  """Fraction of queries whose relevant candidate ranks within the first k."""
  return float(np.mean(ranks(scores_QC, relevant_Q) <= k))


_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def code_terms(text):
  """Lower-cased BM25 terms of code or prose: runs of letters and digits, identifiers split at
  underscores and camel case ("parseHTTPResponse_code" -> parse, http, response, code), English
  stopwords dropped."""
  from bm25s.stopwords import STOPWORDS_EN  # pylint: disable=import-outside-toplevel
  stop = set(STOPWORDS_EN)
  terms = (t.lower() for word in re.findall(r"[A-Za-z0-9]+", text) for t in _CAMEL.findall(word))
  return [t for t in terms if t not in stop]


def bm25_scores(queries, candidates, k1=1.5, b=0.75):
  """[Q, C] BM25 scores (bm25s, Lucene's variant) of `code_terms` over the candidates."""
  import bm25s  # pylint: disable=import-outside-toplevel
  index = bm25s.BM25(k1=k1, b=b)
  index.index([code_terms(c) for c in candidates], show_progress=False)
  vocab = index.vocab_dict
  scores = np.zeros((len(queries), len(candidates)), np.float32)
  for i, q in enumerate(queries):
    terms = [t for t in code_terms(q) if t in vocab]
    if terms:
      scores[i] = index.get_scores(terms)
  return scores


@dataclasses.dataclass
class Result:
  name: str
  mrr_at_10: float
  recall_at_10: float
  num_queries: int
  num_candidates: int


def evaluate(model, queries, candidates, relevant, poolers=pooling.MODES, *, name=None, max_len=128,
             batch_size=64):
  """[`Result`] of dense retrieval with `model` (an `EncoderBundle` or a path for
  `load_encoder`), one per pooler; queries and candidates are embedded once for all poolers."""
  for pooler in poolers:
    pooling.check(pooler, "pooler")
  name = name or (model if isinstance(model, str) else "encoder")
  model = load_encoder(model) if isinstance(model, str) else model
  q = embed_all(model, queries, max_len=max_len, batch_size=batch_size)
  c = embed_all(model, candidates, max_len=max_len, batch_size=batch_size)
  return [_result(f"{name} ({pooler})", cosine_scores(q[pooler], c[pooler]), relevant)
          for pooler in poolers]


def evaluate_bm25(queries, candidates, relevant, name="BM25"):
  return _result(name, bm25_scores(queries, candidates), relevant)


def _result(name, scores_QC, relevant):
  return Result(name, mrr_at_k(scores_QC, relevant, 10), recall_at_k(scores_QC, relevant, 10),
                scores_QC.shape[0], scores_QC.shape[1])
