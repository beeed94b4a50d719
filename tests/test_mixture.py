"""Mixtures of pair sources (pretrain/data/mixture.py): weights, modes, resume, per-source eval."""
import json

import numpy as np
import pytest

from configs import common
from pretrain.data import mixture, pair_files, pairs
from tests.test_contrastive import WordTokenizer

TOK = WordTokenizer()
ALPHA, BETA = TOK.encode_batch(["alpha"])[0][0], TOK.encode_batch(["beta"])[0][0]


def _source(word, n=40):
  rows = [pair_files.PairRow(f"{word} query number {i}", (f"{word} answer {i}",)) for i in range(n)]
  return pair_files.PairSource(rows, word)


def _mixture(weights=(0.7, 0.3), mode="batch", batch=4):
  children = {w: pairs.make_dataset(_source(w), TOK, view="files", seq_len=12, query_len=8,
                                    batch_size=batch, seed=i, num_threads=1)
              for i, w in enumerate(("alpha", "beta"))}
  return mixture.MixtureIterDataset(children, weights, mode, seed=0, local_batch=batch)


def _sources_of(batch):
  first = batch["query_ids"][:, 1]  # The word after [CLS] names the source.
  assert set(first.tolist()) <= {ALPHA, BETA}
  return first == ALPHA


def test_parse_normalises_the_weights_and_names_bad_items():
  assert mixture.parse("a=x/*.jsonl:3,b=y.csv:1") == [("a", "x/*.jsonl", 0.75),
                                                      ("b", "y.csv", 0.25)]
  for bad in ("a=x.jsonl", "a=x.jsonl:0", "=x.jsonl:1", "a=x:1,a=y:1"):
    with pytest.raises(ValueError, match="data.mixture"):
      mixture.parse(bad)


@pytest.mark.parametrize("mode", mixture.MODES)
def test_batches_follow_the_weights_one_source_per_batch_or_mixed_rows(mode):
  it = iter(_mixture(mode=mode))
  shares = [_sources_of(next(it)) for _ in range(150)]
  if mode == "batch":
    assert all(s.all() or not s.any() for s in shares)  # Never two sources in one batch.
  else:
    assert sum(0 < s.mean() < 1 for s in shares) > 50
  assert abs(np.mean(shares) - 0.7) < 0.08


def test_resume_continues_every_source_and_may_change_the_weights():
  it = iter(_mixture(mode="row"))
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(3)]
  again = iter(_mixture(mode="row"))
  again.set_state(state)
  for want in expected:
    got = next(again)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  reweighted = iter(_mixture(weights=(0.05, 0.95), mode="batch"))
  reweighted.set_state(state)
  assert np.mean([_sources_of(next(reweighted)).mean() for _ in range(60)]) < 0.2
  other = iter(mixture.MixtureIterDataset({"alpha": pairs.make_dataset(
      _source("alpha"), TOK, view="files", seq_len=12, query_len=8, batch_size=4, seed=0,
      num_threads=1)}, [1.0], "batch", 0, 4))
  with pytest.raises(ValueError, match="may change the weights, not the sources"):
    other.set_state(state)


def test_the_mixture_config_is_checked():
  c = common.base_config()
  c.data.update(mixture="a=x.jsonl:1")
  with pytest.raises(common.ConfigError, match="data.mixture"):
    common.validate(c)
  assert common.MIXTURE_MODES == mixture.MODES


def test_a_mixture_with_hard_negatives_trains_and_evaluates_each_source(tmp_path):
  from configs import pair_files as recipe  # pylint: disable=import-outside-toplevel
  from pretrain import train  # pylint: disable=import-outside-toplevel
  words = [w for w in pair_files.__doc__.split() if w.isalpha()]
  rng = np.random.default_rng(0)
  for name in ("code", "docs"):
    with open(tmp_path / f"{name}.jsonl", "w", encoding="utf-8") as f:
      for i in range(80):
        f.write(json.dumps({"query": f"{name} " + " ".join(rng.choice(words, 6)),
                            "pos": f"{name} {i} " + " ".join(rng.choice(words, 8)),
                            "neg": [f"def other{i}(y): " + " ".join(rng.choice(words, 8))]})
                + "\n")
  c = recipe.get_config("base=scratch,negatives=2,size=tiny,steps=4,batch_size=8,seq_len=32,"
                        "vocab_size=350")
  c.data.update(paths="", data_dir=str(tmp_path / "data"), validation_fraction=0.2,
                mixture=f"code={tmp_path / 'code.jsonl'}:2,docs={tmp_path / 'docs.jsonl'}:1")
  c.objective.query_len = 16
  c.train.update(eval_every=4, eval_batches=1, async_checkpointing=False, log_every=2)
  final = train.train_and_evaluate(common.validate(c), str(tmp_path / "w"))
  assert np.isfinite(final["eval_code_contrastive_loss"])
  assert np.isfinite(final["eval_docs_contrastive_loss"])
  # The tokenizer was trained on the pair texts (data.name=pair_files has no TFDS build).
  assert (tmp_path / "data" / "tokenizers").is_dir()
