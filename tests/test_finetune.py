"""Fine-tuning: metrics against closed forms, input rows, data readers, configs, and a toy task on
which a tiny MLM-pretrained encoder beats chance and the same model from random initialisation;
a fine-tuning run killed mid-way resumes to the same result."""
import dataclasses
import functools
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from absl import flags as absl_flags
from jax.experimental.compilation_cache import compilation_cache
from ml_collections import config_flags
from tokenizers import Tokenizer, models, pre_tokenizers

from configs import demo
from configs.finetune import common as ft_common, jsonl
from pretrain.interop import hf_bert
from pretrain.training import optimizer as optimizer_lib
from pretrain.finetune import code_tasks, task_tokenizer, tasks
from pretrain.data import tokenizer as tokenizer_lib
from pretrain.data.corpora import python_stdlib
from pretrain.models import encoder as enc
from pretrain.finetune import heads
from tests.conftest import ROOT
from pretrain.finetune import evaluation
from pretrain.finetune import task_workdir, train as finetune_train
from objectives import registry
from pretrain.training import state as state_lib
from pretrain.training import step as step_lib

# --- Closed forms --------------------------------------------------------------------------------


def test_classification_metrics_match_hand_counts():
  pred, labels = np.array([1, 1, 0, 0, 1, 2]), np.array([1, 0, 0, 1, 1, 2])
  m = evaluation.classification_metrics(pred, labels, 3)
  # class 0: tp 1, pred 2, true 2 -> 0.5; class 1: tp 2, pred 3, true 3 -> 2/3; class 2: 1.
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 1) / 3) == m["f1"]
  binary = evaluation.classification_metrics(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 1]), 2)
  assert binary["f1"] == pytest.approx(0.5) and binary["accuracy"] == 0.5  # F1 of class 1.


def test_retrieval_metrics_rank_each_query_among_all_candidates():
  cands = np.eye(4, dtype=np.float32)
  queries = np.array([[1, 0, 0, 0], [0.9, 0.5, 0, 0], [0, 0.2, 0.3, 0.1]], np.float32)
  m = evaluation.retrieval_metrics(queries, cands, np.array([0, 1, 3]))
  # Ranks: 1; 2 (candidate 0 scores higher); 3 (candidates 2 and 1 score higher).
  assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
  assert m["recall_at_1"] == pytest.approx(1 / 3) and m["num_candidates"] == 4


def test_layer_decay_scales_each_layer_by_a_power_of_the_decay():
  params = {"encoder": {"embeddings": {"w": np.ones(2)}, "layer_0": {"w": np.ones(2)},
                        "layer_1": {"w": np.ones(2)}}, "head": {"w": np.ones(2)}}
  tx = finetune_train.scale_by_layer(0.5, num_layers=2)
  out, _ = tx.update(params, tx.init(params))
  assert [float(out["encoder"][k]["w"][0]) for k in ("embeddings", "layer_0", "layer_1")] == [
      0.125, 0.25, 0.5]
  assert float(out["head"]["w"][0]) == 1.0


# --- Heads ---------------------------------------------------------------------------------------

TINY = enc.EncoderConfig(vocab_size=13, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32,
                         max_len=8, dropout_rate=0.0)


def _rows(rng, n=4, prefix=""):
  ids = rng.integers(5, 13, (n, 8)).astype(np.int32)
  seg = (np.arange(8)[None] < np.array([[8], [5], [3], [6]])[:n]).astype(np.int32)
  return {prefix + "input_ids": np.where(seg > 0, ids, 0), prefix + "segment_ids": seg,
          prefix + "positions": np.where(seg > 0, np.arange(8), 0).astype(np.int32),
          prefix + "token_types": np.zeros_like(ids)}


def _predict_and_loss(model):
  """One compiled function: (predictions, (loss, (metrics, state))) without dropout."""
  return jax.jit(lambda p, b: (model.predict(p, b),
                               model.loss(p, {}, b, jax.random.key(1), train=False)))


def test_mean_pooled_classifier_ignores_padding_and_scores_only_weighted_rows():
  model = heads.make("sequence", TINY, num_classes=3, pooling="mean")
  rng = np.random.default_rng(0)
  batch = {**_rows(rng), "labels": np.array([0, 1, 2, 1]), "weights": np.array([1, 1, 1, 0.0])}
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))
  noisy = {**batch, "input_ids": np.where(batch["segment_ids"] > 0, batch["input_ids"], 7)}
  run = _predict_and_loss(model)
  logits, (loss, (metrics, _)) = run(params, batch)
  np.testing.assert_allclose(run(params, noisy)[0], logits, atol=1e-6)
  ce = -jax.nn.log_softmax(logits)[np.arange(4), batch["labels"]]
  assert float(loss) == pytest.approx(float(ce[:3].mean()), rel=1e-5)  # Row 3 weighs 0.
  assert float(metrics["accuracy"][1]) == 3.0


def test_token_loss_scores_only_labelled_positions():
  model = heads.make("token", TINY, num_classes=2)
  batch = {**_rows(np.random.default_rng(1)), "weights": np.ones(4, np.float32)}
  labels = np.full((4, 8), -1, np.int32)
  labels[0, 1], labels[2, 2] = 1, 0
  batch["labels"] = labels
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))
  logits, (loss, _) = _predict_and_loss(model)(params, batch)
  logp = jax.nn.log_softmax(logits)
  assert float(loss) == pytest.approx(-float(logp[0, 1, 1] + logp[2, 2, 0]) / 2, rel=1e-5)


def test_biencoder_loss_is_in_batch_softmax_over_cosine_without_padding_rows():
  model = heads.make("biencoder", TINY, pooling="mean", temperature=0.1)
  rng = np.random.default_rng(2)
  batch = {**_rows(rng, prefix="query_"), **_rows(rng, prefix="doc_"),
           "weights": np.array([1, 1, 1, 0], np.float32)}
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))
  (q, d), (loss, _) = _predict_and_loss(model)(params, batch)
  np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, rtol=1e-5)
  logits = np.asarray(q)[:3] @ np.asarray(d)[:3].T / 0.1
  expected = -np.mean(np.diag(jax.nn.log_softmax(logits)))
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)
  assert model.example_batch(8).keys() == batch.keys()


# --- Rows and data -------------------------------------------------------------------------------

WORDS = ["x", "y", "z"]


class _WordTokenizer:
  """Whitespace words -> ids 10 + index; enough to check the row layout."""

  def encode_batch(self, texts):
    return [[10 + WORDS.index(w) for w in t.split()] for t in texts]


def _task_tokenizer():
  return task_tokenizer.TaskTokenizer(_WordTokenizer(), cls_id=2, sep_id=3, pad_id=0, mask_id=4,
                                  vocab_size=13)


def test_rows_hold_cls_a_sep_b_sep_with_token_types_and_longest_first_truncation():
  tok = _task_tokenizer()
  rows = tasks.encode_rows(tok, ["x y", "x x x x x x", f"x {code_tasks.MASK} y"],
                                ["z", "y y", ""], seq_len=8)
  np.testing.assert_array_equal(rows["input_ids"], [[2, 10, 11, 3, 12, 3, 0, 0],
                                                    [2, 10, 10, 10, 3, 11, 11, 3],
                                                    [2, 10, 4, 11, 3, 0, 0, 0]])
  np.testing.assert_array_equal(rows["token_types"][:2], [[0, 0, 0, 0, 1, 1, 0, 0],
                                                          [0, 0, 0, 0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(rows["segment_ids"][2], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 4, 5, 0, 0])


def test_token_rows_label_the_first_piece_of_each_word():
  class Pieces:  # "z" is two pieces.
    def encode_batch(self, words):
      return [[10] if w == "x" else [11, 12] for w in words]
  tok = task_tokenizer.TaskTokenizer(Pieces(), 2, 3, 0, 4, 13)
  rows = tasks.encode_tokens(tok, [{"tokens": ["x", "z", "x"], "tags": [1, 2, 0]}], 8)
  np.testing.assert_array_equal(rows["input_ids"][0], [2, 10, 11, 12, 10, 3, 0, 0])
  np.testing.assert_array_equal(rows["labels"][0], [-1, 1, 2, -1, 0, -1, -1, -1])


def test_eval_batches_cover_every_row_once_and_weight_padding_zero():
  arrays = {"a": np.arange(10)[:, None]}
  batches = list(tasks.eval_batches(arrays, 4))
  assert [b["a"][:, 0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
  assert batches[-1]["weights"].tolist() == [1, 1, 0, 0]
  halves = [list(tasks.eval_batches(arrays, 4, p, 2))[0]["a"][:, 0].tolist() for p in (0, 1)]
  assert halves == [[0, 1], [2, 3]]


def _data_config(**kw):
  c = ft_common.base_config().data
  c.batch_size = 4  # The tiny files below hold fewer rows than the default batch.
  c.update(kw)
  return c


def test_jsonl_and_csv_tasks_map_string_labels_and_split_off_dev(tmp_path):
  with open(tmp_path / "train.jsonl", "w") as f:
    for i in range(40):
      f.write(json.dumps({"s": f"text {i}", "y": ["neg", "pos"][i % 2]}) + "\n")
  (tmp_path / "test.csv").write_text("s,y\nhello,pos\nbye,neg\n")
  c = _data_config(source="files", train=str(tmp_path / "*.jsonl"), test=str(tmp_path / "test.csv"),
                   text_field="s", label_field="y", dev_fraction=0.25)
  data = tasks.load_task(c, "sequence")
  assert data.label_names == ["neg", "pos"]
  assert len(data.train) + len(data.dev) == 40 and 4 <= len(data.dev) <= 16
  assert data.test == [{"text": "hello", "text_b": "", "label": 1},
                       {"text": "bye", "text_b": "", "label": 0}]
  (tmp_path / "bad.csv").write_text("s,y\nhi,maybe\n")
  c.test = str(tmp_path / "bad.csv")
  with pytest.raises(ValueError, match=r"bad.csv:2: label 'maybe' does not occur in the training "
                     r"split \(training labels: neg, pos\)"):
    tasks.load_task(c, "sequence")
  c.text_field = "text"
  with pytest.raises(ValueError, match=r"train.jsonl:1: no text field 'text' \(the row has: s, y\)"
                     "; give every row one, or set data.text_field"):
    tasks.load_task(c, "sequence")


def test_token_and_retrieval_tasks_from_jsonl(tmp_path):
  rows = [{"tokens": ["def", "f", "(", ")"], "tags": ["KW", "NAME", "O", "O"],
           "query": f"q{i % 3}", "doc": f"d{i % 3}"} for i in range(6)]
  (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = _data_config(source="files", train=str(tmp_path / "t.jsonl"), dev=str(tmp_path / "t.jsonl"))
  tokens = tasks.load_task(c, "token")
  assert tokens.label_names == ["KW", "NAME", "O"] and tokens.dev[0]["tags"] == [0, 1, 2, 2]
  retrieval = tasks.load_task(c, "biencoder")
  assert retrieval.train[1] == {"query": "q1", "doc": "d1"}
  assert (retrieval.test.candidates, retrieval.test.relevant) == (["d0", "d1", "d2"],
                                                                  [0, 1, 2, 0, 1, 2])
  (tmp_path / "t.csv").write_text("tokens,tags\nab,xy\n")
  c.train = c.dev = str(tmp_path / "t.csv")
  with pytest.raises(ValueError, match="t.csv:2: the tokens column 'tokens' holds a string, not a "
                     "list; token tasks read JSONL rows"):
    tasks.load_task(c, "token")


def test_tfds_catalog_dataset_is_read_by_name(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class ToySentiment(tfds.core.GeneratorBasedBuilder):  # Registered under "toy_sentiment".
    VERSION = tfds.core.Version("1.0.0")
    code_path = tfds.core.utils.classproperty(classmethod(python_stdlib.builder_code_path))

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "sentence": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=["negative", "positive"])}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(20),
              "validation": self._generate_examples(6, start=20)}

    def _generate_examples(self, n, start=0):  # pylint: disable=arguments-differ
      for i in range(start, start + n):
        yield i, {"sentence": f"sentence {i}", "label": i % 2}

  ToySentiment(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
  c = _data_config(source="tfds", name="toy_sentiment", data_dir=str(tmp_path), train="train",
                   dev="validation", text_field="sentence")
  data = tasks.load_task(c, "sequence")
  assert data.label_names == ["negative", "positive"] and len(data.train) == 20
  assert sorted((e["text"], e["label"]) for e in data.dev)[:2] == [("sentence 20", 0),
                                                                  ("sentence 21", 1)]
  assert data.test == data.dev  # No test split given: dev is reported as test.


# --- Bad rows, labels and split sizes: one line naming file:line, before anything compiles --------


def _files(tmp_path, **texts):
  """Writes {name: text} into tmp_path; returns {name without suffix: path}."""
  out = {}
  for name, text in texts.items():
    path = tmp_path / name.replace("_", ".", 1)
    path.write_text(text)
    out[name.split("_", 1)[0]] = str(path)
  return out


def _error(c, head="sequence", exc=ValueError, **kw):
  """The one-line message `tasks.load_task` fails with."""
  with pytest.raises(exc) as info:
    tasks.load_task(c, head, **kw)
  message = str(info.value)
  assert "\n" not in message, message
  return message


TRAIN_CSV = "text,label\na,neg\nb,pos\nc,neg\nd,pos\n"
TRAIN_JSONL = "".join(json.dumps({"text": t, "label": y}) + "\n"
                      for t, y in zip("abcd", ["neg", "pos"] * 2))


@pytest.mark.parametrize("row, problem", [
    ("e,", "the label column 'label' is empty; give every row a label or drop the row."),
    (",pos", "the text column 'text' is empty; give the row its text or drop the row."),
    ("e", "1 field where the header (line 1) has 2; quote fields that hold commas, or give the "
          "row every column."),
    ("e,pos,extra", "3 fields where the header (line 1) has 2;"),
])
def test_a_bad_csv_row_is_named_by_its_line(tmp_path, row, problem):
  p = _files(tmp_path, train_csv=TRAIN_CSV + f"{row}\n")
  message = _error(_data_config(source="files", train=p["train"], dev=p["train"]))
  assert message.startswith(f"{p['train']}:6: {problem}"), message


def test_csv_lines_are_physical_lines_and_a_header_must_name_each_column(tmp_path):
  text = 'text,label\n"two\nlines",neg\n\nb,\n'  # The bad row starts on line 5.
  p = _files(tmp_path, train_csv=text, dup_csv="text,text\na,b\n")
  message = _error(_data_config(source="files", train=p["train"]))
  assert message.startswith(f"{p['train']}:5: the label column 'label' is empty"), message
  message = _error(_data_config(source="files", train=p["dup"]))
  assert message == (f"{p['dup']}:1: the header names the column 'text' twice; give every column "
                     "its own name.")
  p = _files(tmp_path, open_csv='text,label\na,neg\n"b,pos\nc,neg\n')
  assert "an unclosed quote?" in _error(_data_config(source="files", train=p["open"]))


def test_malformed_jsonl_is_named_by_file_line_and_column(tmp_path):
  p = _files(tmp_path, train_jsonl=TRAIN_JSONL,
             dev_jsonl=TRAIN_JSONL[:TRAIN_JSONL.index("\n") + 1] + '\n{"t": "ab" 1}\n',
             test_jsonl='["a", "neg"]\n')
  c = _data_config(source="files", train=p["train"], dev=p["dev"])
  assert _error(c) == (f"{p['dev']}:3: not valid JSON (Expecting ',' delimiter at column 12); "
                       "fix the line or remove it.")
  c.dev = p["test"]
  assert _error(c).startswith(f"{p['test']}:1: a list where a JSON object is needed;")
  (tmp_path / "latin.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "neg"}\n')
  c.dev = str(tmp_path / "latin.jsonl")
  assert _error(c).startswith(f"{c.dev}:1: not UTF-8 text (byte 0xe9")


@pytest.mark.parametrize("row, problem", [
    ({"label": "neg"}, "no text field 'text' (the row has: label); give every row one, or set "
                       "data.text_field to the field that holds it."),
    ({"text": "e"}, "no label field 'label' (the row has: text); give every row one, or set "
                    "data.label_field to the field that holds it."),
    ({"text": "e", "label": None}, "the label field 'label' is null; give every row a label"),
    ({"text": "e", "label": 0.5}, "the label field 'label' holds a number (0.5), not a string or "
                                  "an integer;"),
    ({"text": 3, "label": "neg"}, "the text field 'text' holds an integer (3), not a string;"),
    ({"text": " ", "label": "neg"}, "the text field 'text' is empty;"),
])
def test_a_bad_jsonl_row_is_named_by_its_line(tmp_path, row, problem):
  p = _files(tmp_path, train_jsonl=TRAIN_JSONL + json.dumps(row) + "\n")
  message = _error(_data_config(source="files", train=p["train"], dev=p["train"]))
  assert message.startswith(f"{p['train']}:5: {problem}"), message


def test_token_and_pair_rows_are_checked_by_line(tmp_path):
  good = json.dumps({"tokens": ["a", "b"], "tags": ["X", "Y"]})
  p = _files(tmp_path, train_jsonl="\n".join([good] * 4 + [
      json.dumps({"tokens": ["a", "b"], "tags": ["X"]})]) + "\n")
  c = _data_config(source="files", train=p["train"], dev=p["train"])
  assert _error(c, "token") == (f"{p['train']}:5: 2 tokens in 'tokens' but 1 tags in 'tags'; give "
                                "every token one tag.")
  p = _files(tmp_path, pairs_jsonl=json.dumps({"query": "q", "doc": ""}) + "\n")
  c.train = c.dev = p["pairs"]
  assert _error(c, "biencoder").startswith(f"{p['pairs']}:1: the doc field 'doc' is empty;")


def test_declared_labels_are_enforced_on_every_split(tmp_path):
  p = _files(tmp_path, train_jsonl=TRAIN_JSONL, dev_csv="text,label\nx,pos\ny,Pos\n")
  c = _data_config(source="files", train=p["train"], dev=p["dev"])
  assert _error(c, labels=("neg", "pos")) == (
      f"{p['dev']}:3: label 'Pos' is not one of task.labels (neg, pos); fix the row or add the "
      "label to task.labels.")
  c.dev = p["train"]
  assert _error(c, labels=("pos", "other")).startswith(
      f"{p['train']}:1: label 'neg' is not one of task.labels (pos, other);")
  data = tasks.load_task(c, "sequence", labels=("pos", "neg", "unseen"))
  assert data.label_names == ["pos", "neg", "unseen"] and data.train[0]["label"] == 1


def test_inferred_labels_come_from_train_and_integer_labels_leave_no_gap(tmp_path):
  ints = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip("abcde", [0, 1, 0, 1, 7]))
  p = _files(tmp_path, train_jsonl=ints)
  c = _data_config(source="files", train=p["train"], dev=p["train"])
  assert _error(c) == (f"{p['train']}:5: label 7 makes 8 classes but no training row has 2, 3, 4, "
                       "5, 6; integer labels are the classes 0..C-1: fix the row, or declare the "
                       "classes in task.labels.")
  assert tasks.load_task(c, "sequence", labels=tuple("01234567")).label_names[-1] == "7"


def test_missing_files_name_the_config_key(tmp_path):
  p = _files(tmp_path, train_jsonl=TRAIN_JSONL)
  c = _data_config(source="files", train=p["train"], dev=str(tmp_path / "nope" / "dev.jsonl"))
  message = _error(c, exc=FileNotFoundError)
  assert message.startswith(f"No file matches {c.dev!r} in data.dev=") and "set data.dev to" in message
  c.dev = str(tmp_path / "*.json")
  (tmp_path / "dev.json").write_text("{}")
  assert _error(c).startswith(f"{tmp_path / 'dev.json'}: only .jsonl and .csv files are read;")


def test_too_small_splits_fail_before_training(tmp_path):
  p = _files(tmp_path, train_jsonl=TRAIN_JSONL, empty_jsonl="\n",
             unlabelled_jsonl=json.dumps({"text": "a", "label": -1}) + "\n",
             one_csv="text,label\na,pos\nb,pos\nc,pos\nd,pos\n")
  c = _data_config(source="files", train=p["train"], dev=p["train"], batch_size=8)
  assert _error(c) == (f"{p['train']}: 4 training rows, fewer than one batch (data.batch_size=8); "
                       "add rows or lower data.batch_size.")
  assert len(tasks.load_task(c, "sequence", train_steps=0).train) == 4  # Evaluation only.
  c.batch_size, c.dev = 2, ""  # No row of 4 falls under the default 10% dev share.
  assert _error(c) == (f"{p['train']}: none of its 4 training rows fell into the dev share "
                       "(data.dev_fraction=0.1); give data.dev its own file or raise "
                       "data.dev_fraction.")
  c.dev = p["empty"]
  assert _error(c) == f"{p['empty']}: no rows; data.dev needs at least one labelled row."
  c.dev = p["unlabelled"]
  assert _error(c) == (f"{p['unlabelled']}: all 1 rows have a negative label (unlabelled); data.dev "
                       "needs at least one labelled row.")
  c.train, c.dev = p["one"], p["train"]
  message = _error(c, labels=("neg", "pos"))
  assert message == (f"{p['one']}: every training row has the label 'pos'; a classifier needs at "
                     "least 2 classes in the training split: add rows of another class, or check "
                     "data.label_field.")


def test_a_builtin_task_too_small_for_its_batch_or_dev_split_fails_up_front(tmp_path):
  c = _data_config(source="exception_type", cache_dir=str(tmp_path), max_files=3)
  rows = [{"text": "x", "text_b": "", "label": i % 2} for i in range(6)]
  cached = tasks.TaskData(rows, [], rows, ["KeyError", "ValueError"])
  with open(tasks._cache_path(c), "w") as f:  # pylint: disable=protected-access
    json.dump(dataclasses.asdict(cached), f)
  assert _error(c) == ("data.source='exception_type' (data.max_files=3): the dev split has no "
                       "examples; raise data.max_files (0: every file) or data.dev_fraction.")
  c.batch_size = 8
  assert _error(c).startswith("data.source='exception_type' (data.max_files=3): 6 training rows, "
                              "fewer than one batch (data.batch_size=8);")


def test_every_finetune_config_loads_and_validates():
  paths = [p for p in glob.glob(os.path.join(ROOT, "configs", "finetune", "*.py"))
           if os.path.basename(p) not in ("__init__.py", "common.py")]
  assert {os.path.basename(p) for p in paths} >= {"exception_type.py", "docstring_match.py",
                                                  "jsonl.py"}
  import importlib.util  # pylint: disable=import-outside-toplevel
  for path in paths:
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(None)
    config.init = "exports/demo"
    if config.data.source == "files":
      config.data.train = "train.jsonl"
    ft_common.validate(config)
  config.optimizer.layer_decay = 1.5
  with pytest.raises(ValueError, match="optimizer.layer_decay=1.5; allowed: 0 < decay <= 1"):
    ft_common.validate(config)
  config.init = ""
  with pytest.raises(ValueError, match="Bad config value init=''"):
    ft_common.validate(config)


def test_an_unreadable_builtin_cache_is_rebuilt(tmp_path, monkeypatch):
  c = _data_config(source="docstring_match", cache_dir=str(tmp_path))
  rows = [{"text": "q", "text_b": "x", "label": i % 2} for i in range(4)]
  fresh = tasks.TaskData(rows, rows, rows, ["other", "own"])
  monkeypatch.setattr(tasks, "builtin_splits", lambda _: fresh)
  path = tasks._cache_path(c)  # pylint: disable=protected-access
  with open(path, "w") as f:
    f.write('{"train": [')  # Cut short, e.g. by a full disk.
  assert tasks.load_task(c, "sequence") == fresh
  with open(path) as f:
    assert json.load(f)["label_names"] == ["other", "own"]


def test_a_broken_tokenizer_config_is_named(tmp_path):
  tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[CLS]": 1}, unk_token="[UNK]"))
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text('{"cls_token": "[CLS]",')
  with pytest.raises(ValueError, match=r"tokenizer_config.json: not valid JSON \(.*line 1"):
    task_tokenizer.load_task_tokenizer(str(tmp_path))


def test_declared_labels_are_validated_with_the_config():
  config = jsonl.get_config(None)
  config.init, config.data.train = "exports/demo", "train.jsonl"
  config.task.labels = " neg, pos "
  assert ft_common.label_list(ft_common.validate(config).task.labels) == ("neg", "pos")
  for labels, match in (("neg,,pos", "task.labels='neg,,pos'; allowed: '' "),
                        ("pos,pos", "2\\+ distinct"), ("pos", "2\\+ distinct")):
    config.task.labels = labels
    with pytest.raises(ValueError, match=match):
      ft_common.validate(config)
  config.task.labels, config.task.num_classes = "a,b,c", 2
  with pytest.raises(ValueError, match="task.num_classes=2; allowed: 0 or >= the 3 names"):
    ft_common.validate(config)
  config.task.num_classes, config.task.head = 0, "biencoder"
  with pytest.raises(ValueError, match="task.labels='a,b,c'; allowed: '' here"):
    ft_common.validate(config)


def _readme_commands(section):
  """The `python -m pretrain.finetune` command lines of a README section, as argv lists."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = f.read()
  body = text[text.index(f"\n## {section}\n"):]
  body = body[:body.find("\n## ", 4)]
  lines = " ".join(body.replace("\\\n", " ").splitlines()).split("python -m ")[1:]
  return [shlex.split(line.split("#")[0].split("```")[0]) for line in lines
          if line.startswith("pretrain.finetune ")]


def test_the_readme_finetuning_commands_parse_and_validate():
  commands = _readme_commands("Fine-tuning")
  assert len(commands) >= 3, commands
  for command in commands:
    argv = ["finetune"] + [a.replace("--config=", f"--config={ROOT}/", 1) for a in command[1:]]
    fv = absl_flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
    absl_flags.DEFINE_string("workdir", None, "", flag_values=fv)
    fv(argv)
    ft_common.validate(fv.config)


# --- A toy task where pretraining helps ----------------------------------------------------------
#
# Words a0..a11 and b0..b11 (plus fillers) never mix within a pretraining document, so MLM learns
# which group a word belongs to. The task labels 8-word texts by group, but fine-tuning sees only
# words 0..3 of each group and the test only words 6..11: without pretraining the unseen words'
# embeddings are noise (chance); with it they sit with their group.

N_WORDS, N_FILLERS, SEQ = 12, 6, 24
VOCAB = list(tokenizer_lib.RESERVED) + [f"{g}{i}" for g in "ab" for i in range(N_WORDS)] + [
    f"f{i}" for i in range(N_FILLERS)]


def _group_docs(rng, n, length, words=range(N_WORDS)):
  """(groups [n], word ids [n, length]): 80% words of the row's group, 20% shared fillers."""
  groups = rng.integers(2, size=n)
  words = np.asarray(list(words))
  ids = 5 + groups[:, None] * N_WORDS + words[rng.integers(len(words), size=(n, length))]
  fillers = 5 + 2 * N_WORDS + rng.integers(N_FILLERS, size=(n, length))
  return groups, np.where(rng.random((n, length)) < 0.8, ids, fillers).astype(np.int32)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A 2-layer encoder after 80 MLM steps on group documents: a Hugging Face BERT directory with
  a word-level tokenizer.json (the third-party init path)."""
  out = str(tmp_path_factory.mktemp("pretrained"))
  config = demo.get_config(
      f"size=tiny,vocab_size={len(VOCAB)},steps=80,batch_size=32,seq_len={SEQ}")
  config.model.max_len = SEQ
  config.optimizer.learning_rate, config.optimizer.warmup_steps = 3e-3, 10
  objective = registry.build(config, None)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  state = jax.jit(lambda r: nn.unbox(state_lib.init_state(r, objective, tx, SEQ)))(jax.random.key(0))
  step = jax.jit(functools.partial(step_lib.train_step, objective=objective, tx=tx,
                                   schedule=schedule, accum_steps=1))
  rng = np.random.default_rng(0)
  for _ in range(config.train.steps):
    _, words = _group_docs(rng, 32, SEQ - 2)
    ids = np.concatenate([np.full((32, 1), 2), words, np.full((32, 1), 3)], 1).astype(np.int32)
    batch = {"input_ids": ids, "segment_ids": np.ones_like(ids),
             "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), ids.shape)}
    state, metrics = step(state, batch, jax.random.key(1))
  # Entropy of a masked word: 3.40 nats knowing only the filler rate, 2.85 knowing the group too.
  assert float(metrics["mlm_loss"]) < 3.2, "MLM did not learn the groups"
  hf_bert.write_hf_model(out, state.params["encoder"], state.params["mlm_head"],
                         objective.model_config)
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.save(os.path.join(out, "tokenizer.json"))
  return out


@pytest.fixture(scope="module")
def toy_task(tmp_path_factory):
  d = tmp_path_factory.mktemp("task")
  rng = np.random.default_rng(1)
  for name, words, n in (("train", range(4), 160), ("dev", range(4, 6), 64),
                         ("test", range(6, N_WORDS), 192)):
    groups, ids = _group_docs(rng, n, 8, words)
    with open(d / f"{name}.jsonl", "w") as f:
      for g, row in zip(groups, ids):
        f.write(json.dumps({"text": " ".join(VOCAB[i] for i in row),
                            "label": ["alpha", "beta"][g]}) + "\n")
  return d


STEPS = 30


def _toy_flags(init, task):
  return [f"--config={ROOT}/configs/finetune/jsonl.py:steps={STEPS},batch_size=16,seq_len=12,"
          "lr=1e-3", f"--config.init={init}", f"--config.data.train={task / 'train.jsonl'}",
          f"--config.data.dev={task / 'dev.jsonl'}", f"--config.data.test={task / 'test.jsonl'}",
          "--config.train.log_every=5", "--config.train.eval_every=1000",
          "--config.train.checkpoint_every=10"]


def _toy_config(init, task, **overrides):
  config = jsonl.get_config(f"steps={STEPS},batch_size=16,seq_len=12,lr=1e-3")
  for flag in _toy_flags(init, task)[1:]:
    key, value = flag[len("--config."):].split("=", 1)
    section, name = key.split(".") if "." in key else (None, key)
    target = config[section] if section else config
    target[name] = type(target[name])(value)
  for key, value in overrides.items():
    config[key] = value
  return config


_CACHE_OPTIONS = {"jax_compilation_cache_dir": None,
                  "jax_persistent_cache_min_compile_time_secs": 0.0,
                  "jax_persistent_cache_min_entry_size_bytes": 0}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """The toy runs share compiled programs through JAX's persistent cache (compiling the sharded
  step for 8 fake devices costs more than running it); restored to the session's setting after."""
  path = str(tmp_path_factory.mktemp("jax_cache"))
  old = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  for name, value in {**_CACHE_OPTIONS, "jax_compilation_cache_dir": path}.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield {name.upper(): str(value) for name, value in
         {**_CACHE_OPTIONS, "jax_compilation_cache_dir": path}.items()}
  for name, value in old.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def straight(pretrained, toy_task, tmp_path_factory,
             compile_cache):  # pylint: disable=unused-argument
  workdir = str(tmp_path_factory.mktemp("straight"))
  return workdir, finetune_train.train_and_evaluate(_toy_config(pretrained, toy_task), workdir)


def test_pretrained_encoder_beats_chance_and_random_init(straight, pretrained, toy_task, tmp_path):
  _, results = straight
  assert results["source"] == "hf:bert" and results["labels"] == ["alpha", "beta"]
  scratch = finetune_train.train_and_evaluate(_toy_config(pretrained, toy_task, from_scratch=True),
                                        str(tmp_path))
  print(f"test accuracy: pretrained {results['test_accuracy']:.3f}, "
        f"random init {scratch['test_accuracy']:.3f}")
  assert results["test_accuracy"] >= 0.8, results  # 192 test rows: chance is 0.5 +- 0.04.
  assert 0.4 < results["test_majority_accuracy"] < 0.6
  assert results["test_accuracy"] >= scratch["test_accuracy"] + 0.15, (results, scratch)
  with open(os.path.join(straight[0], finetune_train.RESULTS_FILE)) as f:
    assert json.load(f)["test_accuracy"] == results["test_accuracy"]


def test_loading_a_workdir_defines_no_flags_of_its_own():
  """The fine-tuning command defines --workdir and imports pretrain.export's neighbours; export's
  flags exist only when it runs as the main program."""
  code = ("from absl import flags; flags.DEFINE_string('workdir', None, '');"
          "from pretrain import export; from pretrain.finetune import train;"
          "assert 'out' not in flags.FLAGS")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
  proc = subprocess.run([sys.executable, "-m", "pretrain.export", "--help"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  assert "--out" in proc.stdout and "--max_seq_length" in proc.stdout, proc.stderr[-2000:]


def _metric_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_finetuning_resumes_after_a_kill(straight, pretrained, toy_task, tmp_path, compile_cache):
  workdir = tmp_path / "killed"
  cmd = [sys.executable, "-m", "pretrain.finetune", *_toy_flags(pretrained, toy_task),
         f"--workdir={workdir}"]
  # The same 8 fake devices and XLA flags as the straight run, and its compiled programs.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **compile_cache}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "10").exists():
    assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
    time.sleep(0.01)
  still_running = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert still_running, "the run finished before it could be killed: the test proved nothing"
  done = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert done and done[-1] < STEPS, done
  # Rerunning the command resumes; in this process, whose devices and XLA flags the killed run had.
  resumed = finetune_train.train_and_evaluate(_toy_config(pretrained, toy_task), str(workdir))
  assert resumed["step"] == STEPS and resumed["test_accuracy"] == straight[1]["test_accuracy"]
  ours = {r["step"]: r for r in _metric_rows(workdir) if "loss" in r}
  theirs = {r["step"]: r for r in _metric_rows(straight[0]) if "loss" in r}
  assert ours.keys() == theirs.keys() and max(ours) == STEPS
  for step in ours:  # Same data order and same updates after the resume point.
    for key in ("loss", "param_norm"):
      assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-5), (step, key)


# --- Task distillation (pretrain.finetune.distill): the fine-tuned run above is the teacher -----


def test_a_student_distilled_from_the_finetuned_teacher_learns_its_predictions(
    straight, pretrained, toy_task, tmp_path):
  teacher, taught = straight
  workdir = str(tmp_path / "student")
  config = _toy_config(pretrained, toy_task, teacher=teacher, distill_temperature=2.0)
  config.train.checkpoint_every = STEPS  # One save: the final one.
  results = finetune_train.train_and_evaluate(config, workdir)
  rows = [r for r in _metric_rows(workdir) if "distill_kl" in r]
  print(f"distill_kl {rows[0]['distill_kl']:.3f} -> {rows[-1]['distill_kl']:.3f}, dev agreement "
        f"{results['dev_teacher_agreement']:.3f}, test accuracy {results['test_accuracy']:.3f}")
  assert rows[-1]["distill_kl"] < 0.5 * rows[0]["distill_kl"], rows
  assert results["dev_teacher_agreement"] >= 0.8, results  # 64 dev rows, two classes.
  assert results["teacher_test_accuracy"] == taught["test_accuracy"]
  # A distilled workdir is a fine-tuned one: it is the init of a second, plain fine-tuning.
  pre = task_workdir.load_encoder(workdir, what="config.init")
  assert pre.source == "finetuned" and pre.config.num_layers == 2 and "layer_1" in pre.encoder


def test_a_teacher_of_another_task_or_label_set_is_refused_naming_config_teacher(
    straight, pretrained, toy_task, tmp_path):
  teacher, _ = straight
  shutil.copy(toy_task / "train.jsonl", tmp_path / "train.jsonl")
  other_files = _toy_config(pretrained, toy_task, teacher=teacher)
  other_files.data.train = str(tmp_path / "train.jsonl")
  with pytest.raises(ValueError, match=r"config.teacher=.*data.train=.*fine-tune a teacher"):
    finetune_train.train_and_evaluate(other_files, str(tmp_path / "a"))
  three = _toy_config(pretrained, toy_task, teacher=teacher)
  three.task.labels, three.task.num_classes = "alpha,beta,gamma", 3
  with pytest.raises(ValueError, match=r"config.teacher=.*its labels \['alpha', 'beta'\] differ"):
    finetune_train.train_and_evaluate(three, str(tmp_path / "b"))
  more = _toy_config(pretrained, toy_task, teacher=teacher)
  more.task.num_classes = 3
  with pytest.raises(ValueError, match=r"config.teacher=.*its head has 2 classes but this run 3"):
    finetune_train.train_and_evaluate(more, str(tmp_path / "c"))
  # Resuming a run with another teacher (here: none before) is refused before anything trains.
  shutil.copytree(teacher, tmp_path / "resumed")
  with pytest.raises(ValueError, match="trained with teacher='' but the config says"):
    finetune_train.train_and_evaluate(_toy_config(pretrained, toy_task, teacher=teacher),
                                      str(tmp_path / "resumed"))
  with pytest.raises(ValueError, match=r"config.teacher=.*not a pretrain.finetune workdir"):
    finetune_train.train_and_evaluate(_toy_config(pretrained, toy_task, teacher=pretrained),
                                      str(tmp_path / "d"))
