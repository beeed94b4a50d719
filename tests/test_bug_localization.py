"""Bug localisation (task.head=locate): rows labelled at the token of the edit site's first
character (whole-text tokenization, for a WordPiece tokenizer.json and our sentencepiece model),
the pointer loss against its closed form, the scores on hand-counted predictions, one tiny
fine-tuning run on variable_misuse, the refusal of a task without edit sites, and the benchmark's
optional localisation row."""
import json
import logging
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from configs.finetune import common as ft_common, variable_misuse
from pretrain import benchmark
from pretrain.data import python_code, tokenizer as tokenizer_lib
from pretrain.finetune import bug_tasks, evaluation, heads, task_tokenizer, tasks
from pretrain.finetune import train as finetune_train
from pretrain.interop import hf_bert
from pretrain.models import encoder as enc

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
  """A directory holding a 500-piece sentencepiece model of ours, trained on 10 stdlib files."""
  out = tmp_path_factory.mktemp("init")
  texts = [text for _, text in python_code.heldout_files("train", max_files=10)]
  tokenizer_lib.train(texts, str(out / tokenizer_lib.SPM_FILE), 500)
  return out


# --- Rows ----------------------------------------------------------------------------------------

CORRECT = "def f(total, count):\n  return total / count\n"
SITE = CORRECT.index("total /")


def _pair():
  """The correct function and its variable misuse (`total` -> `count` in the return), with the
  site fields bug_tasks.bug_examples gives them."""
  buggy = CORRECT[:SITE] + "count" + CORRECT[SITE + len("total"):]
  return [{"text": CORRECT, "label": 0, "site": [SITE, SITE + 5]},
          {"text": buggy, "label": 1, "site": [SITE, SITE + 5]}]


def test_rows_point_at_the_first_piece_of_the_misused_name_and_cls_for_a_correct_function(
    tmp_path, caplog):
  vocab = SPECIAL + ["def", "f", "(", ")", ",", "):", "return", "/", "tot", "##al", "co", "##unt"]
  wordpiece = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
  wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()  # Words and runs of punctuation.
  wordpiece.save(str(tmp_path / "tokenizer.json"))
  tok = task_tokenizer.load_task_tokenizer(str(tmp_path))
  rows = tasks.encode_locations(tok, _pair(), seq_len=18)
  piece = lambda i: tok.backend.tok.id_to_token(int(i))  # noqa: E731
  correct, buggy = rows["input_ids"]
  assert [piece(i) for i in buggy[:17]] == [
      "[CLS]", "def", "f", "(", "tot", "##al", ",", "co", "##unt", "):", "return", "co", "##unt",
      "/", "co", "##unt", "[SEP]"]
  assert rows["labels"].tolist() == [0, 11] and piece(buggy[11]) == "co"  # "count"'s first piece.
  # The rows differ only in the site's two pieces: as many tokens before it, the same after it.
  assert np.flatnonzero(correct != buggy).tolist() == [11, 12] and piece(correct[11]) == "tot"
  np.testing.assert_array_equal(rows["segment_ids"][0], rows["segment_ids"][1])
  assert rows["segment_ids"][0].tolist() == [1] * 17 + [0]
  np.testing.assert_array_equal(rows["input_ids"],
                                tasks.encode_classification(tok, _pair(), 18)["input_ids"])
  # bug_tasks gives both copies their site: the region the edit replaced, at the same start.
  pairs = bug_tasks.bug_examples("variable_misuse", [("m.py", CORRECT)])
  (s0, e0), (s1, e1) = pairs[0]["site"], pairs[1]["site"]
  assert s0 == s1 and pairs[0]["text"][s0:e0] == pairs[1]["edit"]["before"]
  assert pairs[1]["text"][s1:e1] == pairs[1]["edit"]["after"]
  # A site whose first token would be cut drops the row and its partner (logged); a site just in
  # time stays, as the last token before [SEP].
  cut = tasks.encode_locations(tok, _pair(), seq_len=13)
  assert cut["labels"].tolist() == [0, 11] and cut["input_ids"][1, 12] == tok.sep_id
  early = [{**e, "site": [6, 11]} for e in _pair()]  # The parameter `total`: 3 tokens before.
  with caplog.at_level(logging.WARNING):
    kept = tasks.encode_locations(tok, _pair() + early, seq_len=12)
  assert kept["labels"].tolist() == [0, 4]
  assert "dropped 2 of 4 rows whose edit site lies past 12 tokens" in caplog.text
  with pytest.raises(ValueError, match="Every one of the 2 edit sites lies past data.seq_len=12"):
    tasks.encode_locations(tok, _pair(), seq_len=12)
  with pytest.raises(ValueError, match="Example 0 has no edit site"):
    tasks.encode_locations(tok, [{"text": CORRECT, "label": 0}], seq_len=16)


def test_rows_of_our_sentencepiece_tokenizer_are_the_sequence_rows_without_split_artifacts(
    spm_dir):
  tok = task_tokenizer.load_task_tokenizer(str(spm_dir))
  rows = tasks.encode_locations(tok, _pair(), seq_len=64)
  # The whole text is tokenized as for the sequence head: nothing marks the site...
  np.testing.assert_array_equal(rows["input_ids"],
                                tasks.encode_classification(tok, _pair(), 64)["input_ids"])
  # ...which tokenizing it in pieces split there would (a dummy-prefix piece, a lone space).
  whole = tok.encode_batch([CORRECT])[0]
  pieces = tok.encode_batch([CORRECT[:SITE], CORRECT[SITE:SITE + 5], CORRECT[SITE + 5:]])
  assert sum(pieces, []) != whole
  label = int(rows["labels"][1])
  assert rows["labels"][0] == 0 and tok.backend.id_to_piece(rows["input_ids"][1, label]) in (
      "▁c", "c", "▁co", "co", "▁count", "count")  # The token holding "count"'s "c".
  correct, buggy = rows["input_ids"]
  np.testing.assert_array_equal(correct[:label], buggy[:label])


# --- The pointer -------------------------------------------------------------------------------

def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_pointer_loss_is_cross_entropy_over_the_unmasked_positions():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 6)).astype(np.float32) * 2
  logits[:, 4:] = 50.0  # Padding scores high: masking must remove it, not outweigh it.
  segment_ids = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
  labels, weights = np.array([2, 0, 3]), np.array([1.0, 1.0, 0.0])
  masked = jax.jit(heads.mask_positions)(logits, segment_ids)
  loss, metrics = jax.jit(heads.pointer_loss)(masked, labels, weights)
  ce = [-_log_softmax(logits[r, :n])[labels[r]] for r, n in enumerate(segment_ids.sum(1))]
  assert float(loss) == pytest.approx((ce[0] + ce[1]) / 2, rel=1e-5)  # Row 2 weighs 0.
  assert float(metrics["loss"][0]) / 2 == pytest.approx(float(loss), rel=1e-5)
  probs = np.asarray(jax.nn.softmax(masked))
  assert np.all(probs[segment_ids == 0] == 0) and np.allclose(probs.sum(1), 1)
  hits = [np.argmax(logits[r, :n]) == labels[r] for r, n in enumerate(segment_ids.sum(1))]
  assert float(metrics["accuracy"][0]) == float(int(hits[0]) + int(hits[1]))

  # The task model scores every position of its own rows and masks its padding the same way.
  config = enc.EncoderConfig(vocab_size=13, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                             max_len=6, dropout_rate=0.0)
  model = heads.make("locate", config)
  ids = np.where(segment_ids > 0, rng.integers(5, 13, (3, 6)), 0).astype(np.int32)
  batch = {"input_ids": ids, "segment_ids": segment_ids.astype(np.int32),
           "positions": np.where(segment_ids > 0, np.arange(6), 0).astype(np.int32),
           "token_types": np.zeros_like(ids), "labels": labels, "weights": weights}
  assert model.example_batch(6).keys() == batch.keys() and model.label_shape(6) == (1,)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))
  run = jax.jit(lambda p, b: (model.predict(p, b),
                              model.loss(p, {}, b, jax.random.key(1), train=False)[0]))
  scores, model_loss = run(params, batch)
  assert scores.shape == (3, 6) and scores.dtype == np.float32
  assert np.all(np.asarray(scores)[segment_ids == 0] == heads.MASKED_LOGIT)
  own = [-_log_softmax(np.asarray(scores)[r, :n])[labels[r]]
         for r, n in enumerate(segment_ids.sum(1))]
  assert float(model_loss) == pytest.approx((own[0] + own[1]) / 2, rel=1e-5)


def test_location_scores_match_hand_counts():
  labels = np.array([0, 0, 0, 5, 7, 3, 9, 2])   # Three correct functions, five buggy.
  pred = np.array([0, 4, 0, 5, 1, 3, 0, 2])
  scores = np.full((8, 12), heads.MASKED_LOGIT)  # Positions 10, 11 are padding.
  scores[:, :10] = 0.0
  scores[np.arange(8), pred] = 5.0
  # Row 6: [CLS] on top (2.0), yet 9 positions at 1.0 hold 9e / (e^2 + 9e) = 0.77 of the mass.
  scores[6, :10] = [2.0] + [1.0] * 9
  m = evaluation.location_metrics(scores, labels)
  # As a classifier (top position > 0: buggy): wrong only on rows 1 and 6 -> 6/8.
  assert m["accuracy"] == pytest.approx(6 / 8)
  # Buggy class: tp 4 (rows 3, 4, 5, 7), 5 predicted buggy, 5 truly buggy -> F1 8/10.
  assert m["f1"] == pytest.approx(0.8)
  # Marginally (p([CLS]) < 1/2: buggy) row 6 is right: 7/8; 6 predicted buggy, tp 5 -> F1 10/11.
  assert m["marginal_accuracy"] == pytest.approx(7 / 8)
  assert m["marginal_f1"] == pytest.approx(10 / 11)
  assert m["localization_accuracy"] == pytest.approx(3 / 5)  # Rows 3, 5, 7 of the five buggy.
  assert m["joint_accuracy"] == pytest.approx(5 / 8)  # Rows 0, 2, 3, 5, 7.
  assert m["num_buggy"] == 5
  assert evaluation.location_metrics(np.zeros((2, 4)), np.zeros(2))["localization_accuracy"] == 0.0


# --- A tiny fine-tuning run --------------------------------------------------------------------

def test_a_tiny_locate_run_writes_localization_scores_and_other_tasks_refuse_the_head(
    spm_dir, tmp_path):
  # A 1-layer Hugging Face BERT directory with random weights next to the sentencepiece model
  # (fine-tuning reads both; from_scratch keeps only their shapes).
  init = spm_dir
  config = enc.EncoderConfig(vocab_size=500, hidden_size=16, num_layers=1, num_heads=2,
                             mlp_dim=32, max_len=64)
  ids = np.zeros((1, 8), np.int32)
  params = nn.unbox(enc.Encoder(config).init(jax.random.key(0), ids, ids + 1,
                                             np.arange(8)[None]))["params"]
  hf_bert.write_hf_model(str(init), params, None, config)
  config = variable_misuse.get_config("head=locate,steps=4,batch_size=8,seq_len=64,lr=1e-3")
  config.init, config.from_scratch = str(init), True
  config.data.max_files, config.data.cache_dir = 40, str(tmp_path / "cache")
  config.data.eval_batch_size = 16
  config.train.eval_every = config.train.checkpoint_every = config.train.log_every = 4
  results = finetune_train.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / finetune_train.RESULTS_FILE) as f:
    written = json.load(f)
  assert written["head"] == "locate" and written["step"] == 4
  for key in ("test_localization_accuracy", "test_joint_accuracy", "test_accuracy", "test_f1",
              "test_marginal_accuracy", "test_marginal_f1", "test_majority_accuracy",
              "test_localization_chance"):
    assert 0 <= written[key] <= 1, (key, written)
  assert written == json.loads(json.dumps(results))
  # 64 tokens of a 500-piece vocabulary cut many functions: each test pair is scored or dropped.
  test = tasks.builtin_task(config.data).test
  assert written["test_num_buggy"] > 0
  assert written["test_num_buggy"] + written["test_dropped_pairs"] == len(test) // 2

  config.data.source = "exception_type"  # Refused before anything is read or compiled.
  with pytest.raises(ValueError) as refused:
    finetune_train.train_and_evaluate(config, str(tmp_path / "other"))
  assert str(refused.value) == ("data.source='exception_type' needs task.head='sequence', got "
                                "'locate'.")
  config.data.source, config.data.train = "files", str(tmp_path / "train.jsonl")
  ft_common.validate(config)
  with pytest.raises(ValueError, match=r"^task.head='locate' points at a bug's edit site, which "
                     "only data.source variable_misuse, swapped_operands, wrong_binary_operator "
                     "record; data.source='files' needs another task.head.$"):
    tasks.load_task(config.data, "locate")


def test_the_benchmark_scores_localization_only_when_named(monkeypatch, tmp_path):
  assert "variable_misuse_localization" not in benchmark.TASKS  # Not in the default run.
  assert benchmark.parse_tasks("variable_misuse_localization, mlm") == [
      "mlm", "variable_misuse_localization"]
  for source in ("variable_misuse", "swapped_operands", "wrong_binary_operator"):
    config = benchmark.finetune_config(f"{source}_localization", "m", scratch=True,
                                       budget=benchmark.QUICK, seed=0, cache_dir="c")
    assert (config.data.source, config.task.head, config.train.steps) == (
        source, "locate", benchmark.QUICK.steps)
  done = {"model": {"test_localization_accuracy": 0.6, "test_localization_chance": 0.02},
          "control": {"test_localization_accuracy": 0.1}}
  for run, marginal in zip(done.values(), (0.75, 0.55)):
    run.update(test_num_buggy=100.0, test_joint_accuracy=0.5, test_accuracy=0.7,
               test_marginal_accuracy=marginal, test_dropped_pairs=1)
  monkeypatch.setattr(benchmark, "finetune", lambda c, workdir: done[os.path.basename(workdir)])
  row = benchmark.localization_row("variable_misuse_localization", "m", str(tmp_path),
                                   benchmark.QUICK, 0, "c")
  assert (row.metric, row.n, row.model, row.control, row.reference) == (
      "localization accuracy", 100, 0.6, 0.1, 0.02)
  assert row.reference_name == "chance among the function's tokens"
  assert row.model_se == pytest.approx(np.sqrt(0.6 * 0.4 / 100)) and "1 test pairs" in row.note
  assert "model / control: top position 0.700 / 0.700, marginal 0.750 / 0.550" in row.note
  del done["control"]["test_marginal_accuracy"]  # A control finished by older code.
  row = benchmark.localization_row("variable_misuse_localization", "m", str(tmp_path),
                                   benchmark.QUICK, 0, "c")
  assert "model / control: top position 0.700 / 0.700;" in row.note
