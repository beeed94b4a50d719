"""Search, quantization and ranking metrics (pretrain/search.py); mining and retrieval evaluation,
and the whole pair file -> mined triplets -> trained export -> SentenceTransformer path."""
import json

import numpy as np
import pytest

from pretrain import search
from pretrain.data import pair_files
from tests import e2e


def test_metrics_match_their_closed_forms():
  ids = np.array([[4, 1, 2, 0], [0, 1, 2, 3], [3, 2, 1, 0]])
  relevant = [{1}, {0, 2}, {5}]
  m = search.metrics(ids, relevant, ks=(1, 2))
  assert m["mrr@10"] == pytest.approx((1 / 2 + 1 + 0) / 3)
  assert m["recall@1"] == pytest.approx((0 + 0.5 + 0) / 3)
  assert m["recall@2"] == pytest.approx((1 + 0.5 + 0) / 3)
  ndcg = [(1 / np.log2(3)) / 1.0, (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3)), 0.0]
  assert m["ndcg@10"] == pytest.approx(np.mean(ndcg))


def test_top_k_is_exact_and_quantizations_keep_the_order_of_clear_winners():
  rng = np.random.default_rng(0)
  corpus = rng.standard_normal((300, 16)).astype(np.float32)
  queries = corpus[:40] + 0.05 * rng.standard_normal((40, 16)).astype(np.float32)
  scores, ids = search.top_k(queries, corpus, 5, block=16)
  full = queries @ corpus.T
  np.testing.assert_array_equal(ids, np.argsort(-full, 1, kind="stable")[:, :5])
  np.testing.assert_allclose(scores, np.sort(full, 1)[:, ::-1][:, :5], rtol=1e-5)
  for kind in search.QUANTIZATIONS:
    q, c = search.quantize(queries, kind, corpus), search.quantize(corpus, kind)
    _, top = search.top_k(q, c, 1)
    assert np.mean(top[:, 0] == np.arange(40)) > 0.9, kind  # Near-duplicates stay on top.
  int8 = search.quantize(corpus, "int8")
  assert int8.min() >= -128 and int8.max() <= 127 and np.all(int8 == np.round(int8))
  assert set(np.unique(search.quantize(corpus, "binary"))) == {-1.0, 1.0}


def _pair_file(path, n=40):
  words = [w for w in pair_files.__doc__.split() if w.isalpha()]
  rng = np.random.default_rng(1)
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      topic = " ".join(rng.choice(words, 4))
      f.write(json.dumps({"query": f"how to {topic} {i}",
                          "pos": [f"def f{i}(): {topic} {' '.join(rng.choice(words, 6))}"]})
              + "\n")
  return str(path)


def test_bm25_mining_keeps_ranked_non_positives_and_is_deterministic(tmp_path):
  pairs = _pair_file(tmp_path / "pairs.jsonl")
  out, again = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  flags = [f"--pairs={pairs}", "--bm25", "--num_negatives=3", "--range_min=1", "--range_max=8",
           "--sampling=random", "--seed=3", "--relative_margin=0.0"]
  proc = e2e.run("pretrain.mine", *flags, f"--out={out}")
  e2e.run("pretrain.mine", *flags, f"--out={again}")
  assert out.read_text() == again.read_text() and "Wrote 40 rows" in proc.stdout
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  for r in rows:
    assert len(r["neg"]) <= 3 and not set(r["neg"]) & set(r["pos"])
    assert all(s <= r["pos_score"] for s in r["neg_scores"])
    assert r["neg_scores"] == sorted(r["neg_scores"], reverse=True)
  assert sum(len(r["neg"]) for r in rows) > 40  # Most rows found negatives.
  # A second run onto an existing file stops before scoring anything.
  bad = e2e.run("pretrain.mine", *flags, f"--out={out}", check=False)
  assert bad.returncode == 1 and "exists; pass --overwrite" in bad.stderr


def test_pairs_to_mined_triplets_to_an_export_sentence_transformers_loads(tmp_path):
  pairs = _pair_file(tmp_path / "pairs.jsonl", n=120)
  triplets = tmp_path / "triplets.jsonl"
  e2e.run("pretrain.mine", f"--pairs={pairs}", "--bm25", "--num_negatives=2", "--range_min=1",
          f"--out={triplets}")
  workdir, export = tmp_path / "w", tmp_path / "export"
  e2e.run("pretrain.main", "--config=configs/pair_files.py:base=scratch,negatives=2,size=tiny,"
          "steps=6,batch_size=8,seq_len=32,vocab_size=350", f"--workdir={workdir}",
          f"--config.data.paths={triplets}", f"--config.data.data_dir={tmp_path / 'data'}",
          "--config.data.validation_fraction=0.2", "--config.objective.query_len=16",
          "--config.train.eval_every=6", "--config.train.eval_batches=1")
  e2e.run("pretrain.export", f"--workdir={workdir}", f"--out={export}")
  scores = tmp_path / "scores.json"
  proc = e2e.run("pretrain.eval_retrieval", f"--model={export}", f"--pairs={triplets}", "--bm25",
                 f"--json={scores}")
  rows = json.loads(scores.read_text())["rows"]
  assert [(r["model"], r["quantization"]) for r in rows] == [
      (str(export), "float32"), (str(export), "int8"), (str(export), "binary"), ("BM25", "-")]
  assert all(0 <= r["mrr@10"] <= 1 and r["recall@1"] <= r["recall@10"] <= r["recall@100"]
             for r in rows)
  assert rows[1]["bytes"] == rows[0]["bytes"] / 4 == rows[2]["bytes"] * 8
  assert "| BM25 | - | - |" in proc.stdout
  from sentence_transformers import SentenceTransformer  # pylint: disable=import-outside-toplevel
  embeddings = SentenceTransformer(str(export), device="cpu").encode(["how to sort a list"])
  assert embeddings.shape == (1, 64) and np.isfinite(embeddings).all()


def test_a_query_on_several_rows_has_all_their_positives_and_one_split():
  rows = [pair_files.PairRow("q", ("a",)), pair_files.PairRow("q", ("b",), ("c",)),
          pair_files.PairRow("r", ("a",))]
  corpus, relevant = search.corpus_of(rows)
  assert corpus == ["a", "b", "c"] and relevant == [{0, 1}, {0, 1}, {0}]
  splits = {pair_files.split_of(pair_files.PairRow("same query", (p,)), 0.5) for p in "xyzw"}
  assert len(splits) == 1
