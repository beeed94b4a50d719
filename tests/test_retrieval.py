"""Retrieval evaluation: ranking metrics and BM25 against closed forms, embeddings against the
encoder run directly (independent of batching, padding and order)."""
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrain import retrieval
from pretrain.data import tokenizer as tokenizer_lib
from pretrain.models import encoder as enc


def test_ranks_mrr_and_recall_closed_form():
  scores = np.array([[0.9, 0.1, 0.5],    # relevant 0 -> rank 1
                     [0.2, 0.3, 0.8],    # relevant 1 -> rank 2
                     [0.7, 0.7, 0.7]])   # relevant 2 -> ties count against it: rank 3
  relevant = [0, 1, 2]
  np.testing.assert_array_equal(retrieval.ranks(scores, relevant), [1, 2, 3])
  assert retrieval.mrr_at_k(scores, relevant, k=10) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
  assert retrieval.mrr_at_k(scores, relevant, k=2) == pytest.approx((1 + 1 / 2) / 3)
  assert retrieval.recall_at_k(scores, relevant, k=1) == pytest.approx(1 / 3)


def test_code_terms_split_identifiers_and_drop_stopwords():
  assert retrieval.code_terms("def parseHTTPResponse_code(x2):") == [
      "def", "parse", "http", "response", "code", "x", "2"]
  assert retrieval.code_terms("Return the value of a key.") == ["return", "value", "key"]


def test_bm25_scores_match_the_lucene_formula():
  candidates = ["def read_file(path): return open(path).read()",
                "def write_file(path, data): open(path, 'w').write(data)",
                "class Parser: pass",
                "def parse(text): return Parser().feed(text)"]
  queries = ["Read a file from a path", "parse text"]
  scores = retrieval.bm25_scores(queries, candidates, k1=1.2, b=0.75)
  docs = [retrieval.code_terms(c) for c in candidates]
  avgdl = np.mean([len(d) for d in docs])
  expected = np.zeros((2, 4))
  for i, q in enumerate(queries):
    for term in set(retrieval.code_terms(q)):
      df = sum(term in d for d in docs)
      if not df:
        continue
      idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
      for j, d in enumerate(docs):
        tf = d.count(term)
        # Lucene drops Robertson's constant (k1 + 1) factor: same ranking.
        expected[i, j] += idf * tf / (tf + 1.2 * (1 - 0.75 + 0.75 * len(d) / avgdl))
  np.testing.assert_allclose(scores, expected, rtol=1e-5)
  assert np.argmax(scores[0]) == 0 and np.argmax(scores[1]) == 3


def _bundle():
  config = enc.EncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                             max_len=64, dropout_rate=0.0)
  ids = jnp.ones((1, 8), jnp.int32)
  params = nn.unbox(enc.Encoder(config).init(jax.random.key(0), ids, ids, ids)["params"])
  # Characters -> ordinary ids, and our reserved ids: enough of a tokenizer for `embed`.
  tokenizer = types.SimpleNamespace(
      encode_batch=lambda texts: [[5 + ord(ch) % 59 for ch in t] for t in texts],
      pad_id=tokenizer_lib.PAD_ID, cls_id=tokenizer_lib.CLS_ID, sep_id=tokenizer_lib.SEP_ID)
  return retrieval.EncoderBundle(params, config, tokenizer)


def test_embeddings_are_the_encoders_states_whatever_the_batching():
  bundle = _bundle()
  texts = ["x" * 40, "a", "some longer text"]  # Truncated; alone in its batch; padded to 16.
  together = retrieval.embed_all(bundle, texts, max_len=32, batch_size=2)
  apply = jax.jit(lambda ids_BL: enc.Encoder(bundle.config).apply(
      {"params": bundle.params}, ids_BL, jnp.ones_like(ids_BL),
      jnp.arange(ids_BL.shape[1])[None]))
  for i, text in enumerate(texts):
    ids = [tokenizer_lib.CLS_ID, *bundle.tokenizer.encode_batch([text])[0][:30],
           tokenizer_lib.SEP_ID]
    hidden = np.asarray(apply(jnp.asarray([ids])))[0]  # Unpadded, one text.
    np.testing.assert_allclose(together["cls"][i], hidden[0], atol=2e-5)
    np.testing.assert_allclose(together["mean"][i], hidden.mean(0), atol=2e-5)
    np.testing.assert_allclose(together["max"][i], hidden.max(0), atol=2e-5)
  alone = retrieval.embed(bundle, texts[2:], "mean", max_len=32, batch_size=2)
  np.testing.assert_allclose(alone[0], together["mean"][2], atol=2e-5)
  with pytest.raises(ValueError, match="Unknown pooler 'sum'; allowed: cls, mean, max"):
    retrieval.embed(bundle, texts, "sum")


def test_evaluate_finds_candidates_identical_to_their_queries():
  bundle = _bundle()
  candidates = ["def f(a): return a", "class K: pass", "x = [i for i in y]", "import os, sys"]
  results = retrieval.evaluate(bundle, candidates[2:], candidates, [2, 3], name="tiny",
                               max_len=32, batch_size=2)
  assert [r.name for r in results] == ["tiny (cls)", "tiny (mean)", "tiny (max)"]
  assert all(r.mrr_at_10 == 1.0 and r.recall_at_10 == 1.0 and r.num_candidates == 4
             for r in results)


def test_load_encoder_names_what_it_expects(tmp_path):
  with pytest.raises(FileNotFoundError, match="is none of: a pretraining workdir"):
    retrieval.load_encoder(str(tmp_path))
