"""pretrain/probes.py: the frozen-feature probe, retrieval subsets, and probes during pretraining."""
import json
import os

import numpy as np
import pytest

from configs import common
from objectives.checks import ConfigError
from pretrain import probes, train
from pretrain.finetune import heldout_mlm, task_tokenizer
from pretrain.models import encoder_config


def _gaussians(rng, n, d, classes, separation):
  y = rng.integers(0, classes, n).astype(np.int32)
  centres = rng.normal(size=(classes, d)) * separation
  return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_the_probe_learns_what_the_features_hold_and_nothing_else():
  rng = np.random.default_rng(0)
  x, y = _gaussians(rng, 900, 16, 3, separation=3.0)
  split = lambda a: (a[:600], a[600:750], a[750:])  # noqa: E731
  (xt, xd, xs), (yt, yd, ys) = split(x), split(y)
  separable = probes.fit_and_score(xt, yt, xd, yd, xs, ys, 3)
  assert separable["test_accuracy"] > 0.95 and separable["l2"] in probes.L2_GRID
  # Labels independent of the features: the probe stays at chance (1/3, s.e. 0.04 on 150 rows).
  shuffled = rng.permutation(y)
  _, _, yss = split(shuffled)
  chance = probes.fit_and_score(xt, shuffled[:600], xd, shuffled[600:750], xs, yss, 3)
  assert abs(chance["test_accuracy"] - 1 / 3) < 0.12
  assert probes.majority_accuracy([{"label": 1}] * 3 + [{"label": 0}],
                                  [{"label": 1}, {"label": 0}]) == 0.5


def test_subsets_are_seeded_and_keep_every_query_with_its_answer():
  rows = list(range(100))
  a, b = probes.subsample(rows, 10, seed=3), probes.subsample(rows, 10, seed=3)
  assert a == b == sorted(a) and len(set(a)) == 10 and a != probes.subsample(rows, 10, seed=4)
  assert probes.subsample(rows, 0, 1) == rows
  candidates = [f"c{i}" for i in range(50)]
  queries, relevant = [f"q{i}" for i in range(0, 50, 2)], list(range(0, 50, 2))
  q, c, r = probes.retrieval_subset(queries, candidates, relevant, 20, seed=0)
  assert len(c) == 20 and 0 < len(q) == len(r) < len(queries)
  assert all(c[j] == "c" + qi[1:] for qi, j in zip(q, r))  # Each query still finds its own code.


def test_the_probe_lists_match_the_config_checks():
  assert common.PROBE_TASKS == probes.TASKS
  c = common.base_config()
  c.train.update(probe_every=300, eval_every=200)
  with pytest.raises(ConfigError, match="train.probe_every"):
    common.validate(c)
  c.train.update(probe_every=400, probe_tasks="exception_type,mlm")
  with pytest.raises(ConfigError, match="train.probe_tasks"):
    common.validate(c)


def test_pair_features_are_both_sides_and_their_interactions():
  cfg = encoder_config.EncoderConfig(vocab_size=64, hidden_size=16, num_heads=2, mlp_dim=32,
                                     num_layers=1, max_len=64)
  params, _ = heldout_mlm.random_init(cfg, 0)

  class Chars:  # A tokenizer with one id per character: enough for the encoder.
    def encode_batch(self, texts):
      return [[5 + ord(ch) % 59 for ch in t] for t in texts]

  tok = task_tokenizer.TaskTokenizer(Chars(), 2, 3, 0, 4, 64)
  rows = [{"text": "def f(x):", "text_b": "return x", "label": 1},
          {"text": "a much longer query than the other one", "text_b": "y", "label": 0}]
  one = probes.example_features(params, cfg, tok, rows, "exception_type", 32)
  pair = probes.example_features(params, cfg, tok, rows, "docstring_match", 32)
  h = cfg.hidden_size
  assert one.shape == (2, h) and pair.shape == (2, 4 * h)
  v = probes.features(params, cfg, tok, [r["text_b"] for r in rows], 32)
  np.testing.assert_allclose(pair[:, :h], one, atol=1e-6)
  np.testing.assert_allclose(pair[:, 2 * h:3 * h], np.abs(one - v), atol=1e-6)
  # Sorting rows by length for batching does not change any row's features.
  np.testing.assert_allclose(probes.features(params, cfg, tok, [rows[1]["text"]], 32)[0], one[1],
                             atol=1e-5)


def test_pretraining_logs_the_probes_at_step_0_and_the_end(corpus, tmp_path):
  c = common.validate(train_config(corpus))
  workdir = str(tmp_path / "w")
  final = train.train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  probed = [r for r in rows if "probe_docstring_retrieval_mrr" in r]
  assert [r["step"] for r in probed] == [0, 6]
  for r in probed:
    assert 0 <= r["probe_exception_type_accuracy"] <= 1
    assert 0 < r["probe_docstring_retrieval_mrr"] <= 1
  assert final["probe_docstring_retrieval_mrr"] == probed[-1]["probe_docstring_retrieval_mrr"]


def train_config(corpus):
  from configs import demo  # pylint: disable=import-outside-toplevel
  c = demo.get_config("size=tiny,vocab_size=400,steps=6,batch_size=8,seq_len=64")
  c.data.update(name="local_text", paths=str(corpus / "code.jsonl"),
                data_dir=str(corpus / "tfds"), validation_fraction=0.2)
  c.train.update(eval_every=3, eval_batches=1, async_checkpointing=False, probe_every=6,
                 probe_rows=32, probe_max_files=100)
  return c


def test_the_report_prints_the_probes_against_step_0(tmp_path):
  from pretrain import report  # pylint: disable=import-outside-toplevel
  rows = [{"step": 0, "eval_mlm_accuracy": 0.0, "probe_exception_type_accuracy": 0.2},
          {"step": 10, "mlm_loss": 3.0, "tokens_per_s": 100.0},
          {"step": 20, "eval_mlm_accuracy": 0.3, "probe_exception_type_accuracy": 0.45}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  s = report.summary(str(tmp_path))
  assert s["last_eval"] == {"step": 20, "eval_mlm_accuracy": 0.3}  # No probe keys in it.
  table = report.suite_table(s["first_probe"], s["last_probe"])
  assert table.splitlines()[2] == "| exception_type_accuracy | 0.200 | 0.450 | +0.250 |"
