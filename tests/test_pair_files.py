"""Pair files (pretrain/data/pair_files.py), the `files` view and hard negatives in the loss."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from objectives import contrastive_losses as losses, registry
from objectives.checks import ConfigError
from pretrain.data import pair_files, pairs
from tests.conftest import fake_tokenizer
from tests.test_contrastive import V, WordTokenizer, _config, _random_params

FLAG_ROWS = [
    {"query": "sort a list", "pos": ["def sort(xs): return sorted(xs)"],
     "neg": ["def add(a, b): return a + b", "def mul(a, b): return a * b"]},
    {"query": "read a file", "pos": ["def read(p): return open(p).read()", "open(p).read()"],
     "neg": ["def write(p): pass"]},
    {"query": "no negatives here", "pos": "def f(): return 1"},
]


def _write_jsonl(path, rows, extra_lines=()):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
  return str(path)


def test_flagembedding_jsonl_with_prefixes_and_bad_rows_reported(tmp_path, capsys):
  path = _write_jsonl(tmp_path / "train.jsonl", FLAG_ROWS, extra_lines=(
      '{"query": "", "pos": ["x"]}', '{"query": "q", "pos": [3]}', "not json"))
  rows = pair_files.read(path, query_prefix="query: ", doc_prefix="passage: ")
  assert len(rows) == 3
  assert rows[0] == pair_files.PairRow("query: sort a list",
                                       ("passage: def sort(xs): return sorted(xs)",),
                                       ("passage: def add(a, b): return a + b",
                                        "passage: def mul(a, b): return a * b"))
  assert rows[2].neg == () and rows[1].pos[1] == "passage: open(p).read()"
  out = capsys.readouterr().out
  assert f"Skipped 3 of 6 pair rows (first: {path}:4: the query field 'query' is missing" in out


def test_sentence_transformers_csv_and_parquet_columns(tmp_path):
  csv_path = tmp_path / "triplets.csv"
  csv_path.write_text('anchor,positive,negative_1,negative_2\n'
                      'a query,"its, answer",wrong one,\n'
                      'second query,second answer,bad 1,bad 2\n', encoding="utf-8")
  rows = pair_files.read(str(csv_path))
  assert rows == [pair_files.PairRow("a query", ("its, answer",), ("wrong one",)),
                  pair_files.PairRow("second query", ("second answer",), ("bad 1", "bad 2"))]
  pq = pytest.importorskip("pyarrow.parquet")
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  pq.write_table(pa.table({"q": ["x y"], "d": ["z"]}), str(tmp_path / "p.parquet"))
  fields = pair_files.Fields.parse("q,d")
  assert pair_files.read(str(tmp_path / "p.parquet"), fields) == [
      pair_files.PairRow("x y", ("z",))]


def test_unusable_files_and_globs_are_one_error_naming_them(tmp_path):
  with pytest.raises(FileNotFoundError, match="matches no file"):
    pair_files.read(str(tmp_path / "missing*.jsonl"))
  bad = _write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "pos": ""}])
  with pytest.raises(ValueError, match=f"{bad}: no usable \\(query, positive\\) row"):
    pair_files.read(bad)
  other = _write_jsonl(tmp_path / "other.jsonl", [{"title": "q", "body": "d"}])
  with pytest.raises(ValueError, match="no query field among query, anchor"):
    pair_files.read(other)
  with pytest.raises(ValueError, match="data.pair_fields='q'"):
    pair_files.Fields.parse("q")


def test_the_files_view_gives_k_negatives_per_query_and_empty_rows_when_short(tmp_path):
  rows = pair_files.read(_write_jsonl(tmp_path / "t.jsonl", FLAG_ROWS))
  source = pair_files.PairSource(rows, "test")
  ds = pairs.make_dataset(source, WordTokenizer(), view="files", seq_len=12, query_len=8,
                          batch_size=3, seed=0, shuffle=False, num_epochs=1, num_threads=1,
                          num_negatives=2)
  batch = next(iter(ds))
  assert batch["neg_ids"].shape == (3, 2 * 12) and batch["query_ids"].shape == (3, 8)
  neg = batch["neg_ids"].reshape(3, 2, 12)
  tok = WordTokenizer()
  for r, row in enumerate(rows):
    expected = [[2, *ids, 3] for ids in tok.encode_batch(list(row.neg))]
    got = [n[:n.tolist().index(3) + 1].tolist() if 3 in n.tolist() else [] for n in neg[r]]
    assert got[:len(expected)] == expected[:2]
    assert all(not any(n) for n in neg[r, len(expected):])  # Missing negatives: empty rows.
  assert batch["neg_segment_ids"].reshape(3, 2, 12)[2].sum() == 0


def test_info_nce_with_more_candidates_than_queries_equals_its_closed_form():
  rng = np.random.default_rng(0)
  q, c = rng.standard_normal((3, 4)), rng.standard_normal((3 + 6, 4))
  valid_c = np.ones(9, bool)
  valid_c[7] = False  # An empty negative row.
  loss, logits, (correct, count) = losses.info_nce(q, c, jnp.ones(3, bool), 0.5,
                                                   valid_C=jnp.asarray(valid_c))
  s = q @ c.T / 0.5
  kept = [j for j in range(9) if valid_c[j]]
  expected = [np.log(np.exp(s[i, kept]).sum()) - s[i, i] for i in range(3)]
  np.testing.assert_allclose(float(loss), np.mean(expected), rtol=1e-5)
  assert logits.shape == (3, 9) and int(count) == 3


def _negative_batch(seed, b=8, k=2, length=32):
  rng = np.random.default_rng(seed)

  def block(n, width):
    ids = np.zeros((n, width), np.int32)
    for r in range(n):
      m = int(rng.integers(5, width))
      ids[r, :m] = [2, *rng.integers(5, V, m - 2), 3]
    seg = (ids > 0).astype(np.int32)
    return ids, seg, np.where(seg > 0, np.arange(width), 0).astype(np.int32)

  out = {}
  for name, n, width in (("query", b, 16), ("doc", b, length)):
    out.update(zip((f"{name}_ids", f"{name}_segment_ids", f"{name}_positions"), block(n, width)))
  neg = block(b * k, length)
  neg[0][3] = neg[1][3] = neg[2][3] = 0  # Query 1's second negative is an empty row.
  out.update(zip(pairs.NEG_KEYS, (x.reshape(b, k * length) for x in neg)))
  return out


def _files_config(num_negatives):
  from configs import common, contriever  # pylint: disable=import-outside-toplevel
  config = contriever.get_config(f"size=tiny,vocab_size={V},batch_size=8,seq_len=32,normalize=True")
  config.model.dropout_rate = 0.0
  config.data.name = "pair_files"
  config.objective.update(view="files", num_negatives=num_negatives, query_len=16)
  return common.validate(config)


def test_the_loss_scores_hard_negatives_next_to_the_in_batch_candidates():
  config = _files_config(2)
  objective = registry.build(config, fake_tokenizer(V))
  params, batch = _random_params(objective), _negative_batch(1)
  rng = jax.random.key(2)

  @jax.jit
  def loss_and_reference(params, batch):
    total, (metrics, _) = objective.loss(params, {}, batch, rng, train=False)
    q_rows, d_rows = objective.views(None, batch)
    n_rows = objective.negatives(batch)
    emb = lambda rows: objective.embeddings(params["encoder"], {}, rows, rng, False)[:, -1]  # noqa: E731
    q, d, n = (losses.nest(emb(r), 64, True) for r in (q_rows, d_rows, n_rows))
    valid_c = jnp.concatenate([jnp.ones(8, bool), n_rows["segment_ids"][:, 0] > 0])
    ref, logits, _ = losses.info_nce(q, jnp.concatenate([d, n]), jnp.ones(8, bool), 0.05,
                                     valid_C=valid_c)
    return total, ref, logits

  total, ref, logits = loss_and_reference(params, batch)
  np.testing.assert_allclose(float(total), float(ref), rtol=1e-6)
  assert logits.shape == (8, 8 + 16) and float(logits[0, 8 + 3]) < -1e8  # The empty negative.
  plain = _config("normalize=True", view="docstring", query_len=16)
  without = registry.build(plain, fake_tokenizer(V))
  in_batch = float(jax.jit(lambda p, b: without.loss(p, {}, b, rng, train=False)[0])(
      params, {k: v for k, v in batch.items() if not k.startswith("neg_")}))
  assert float(total) > in_batch  # More candidates: a harder softmax.


def test_negatives_need_the_files_view_and_the_files_view_needs_pair_files():
  with pytest.raises(ConfigError, match="objective.num_negatives"):
    _config("", num_negatives=2)
  with pytest.raises(ConfigError, match="objective.view"):
    _config("", view="files")
