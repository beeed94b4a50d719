"""Fine-tuning datasets: built-in code tasks, local JSONL/CSV files, TFDS catalog datasets.

`load_task(data_config, head)` returns a `TaskData` of plain Python examples; `encode_*` turn
them into fixed-length int32 rows ([CLS] a [SEP] (b [SEP]), padding, see
`pretrain.finetune.heads`), and `train_iterator` / `eval_batches` batch those rows.
`encode_locations` labels a bug task's rows with the position of the edited token instead (head
"locate": 0 for a correct function).

Sources (`data_config.source`):
  exception_type       the masked exception name of an `except Name:` clause, among the
                       `num_exception_types` most frequent (`pretrain.finetune.code_tasks`);
  docstring_match      (docstring, code) pairs: label 1 for the function's own code, 0 for
                       another function's (one of each per documented function);
  docstring_retrieval  (docstring, code) pairs for a bi-encoder; dev/test are retrieval sets
                       (every query against every function of the split);
  variable_misuse, swapped_operands, wrong_binary_operator
                       CuBERT's synthetic bugs: each function as it is (label 0) and with one
                       edit (label 1), `pretrain.finetune.bug_tasks`;
  files                local .jsonl / .csv files (`train`, `dev`, `test`: comma-separated globs);
  tfds                 a prepared TFDS dataset by catalog name (`name`, e.g. "glue/sst2"), with
                       `train` / `dev` / `test` as split names.
Built-in tasks never leave the machine: train and dev examples come from the pretraining "train"
files of the interpreter's standard library (split again by a hash of the file path, so no
function or try statement is in both), test examples from the held-out files pretraining never
saw (`python_code.heldout_files("heldout")`). They are cached as JSON under `cache_dir`.
Where dev is not given, it is `dev_fraction` of the training rows (by a hash of the row number).
Rows, labels and split sizes are checked as they are read (`pretrain.finetune.task_files`): the
label set is task.labels when declared, else the training split's, and every dev/test label must
be in it; a bad row is one error line naming its file:line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import grain
import numpy as np
from absl import logging

from pretrain.finetune import bug_tasks, code_tasks, task_files
from pretrain.finetune.task_tokenizer import TaskTokenizer
from pretrain.data import pipeline
from pretrain.data.corpora import python_stdlib

BUILTIN = code_tasks.FINETUNE_TASKS
SOURCES = BUILTIN + ("files", "tfds")


# --- Examples ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Retrieval:
  """A retrieval evaluation set: relevant[i] is the index in `candidates` of query i's answer."""
  queries: list
  candidates: list
  relevant: list


@dataclasses.dataclass
class TaskData:
  """Examples per split. Classification: {"text", "text_b", "label"}; token: {"tokens",
  "tags"}; retrieval: train {"query", "doc"}, dev/test `Retrieval`."""
  train: list
  dev: object
  test: object
  label_names: list | None = None


def builtin_splits(c) -> TaskData:
  """A built-in task's splits (`code_tasks.finetune_splits`) as TaskData."""
  d = code_tasks.finetune_splits(
      c.source, validation_fraction=c.validation_fraction, dev_fraction=c.dev_fraction,
      max_files=c.max_files or None, num_classes=c.num_exception_types, seed=c.seed, sites=True)
  as_split = lambda v: Retrieval(*v) if isinstance(v, tuple) else v  # noqa: E731
  return TaskData(d["train"], as_split(d["dev"]), as_split(d["test"]), d["label_names"])


def _cache_path(c) -> str:
  fields = {k: c[k] for k in ("source", "validation_fraction", "dev_fraction", "max_files",
                              "num_exception_types", "seed")}
  if c.source in bug_tasks.BUG_TASKS:
    fields["rows"] = "site"  # Bug rows carry their edit site; caches written before lack it.
  key = json.dumps(fields, sort_keys=True)
  origin = f"py{sys.version_info.major}.{sys.version_info.minor}"
  digest = hashlib.sha1((key + python_stdlib.stdlib_root()).encode()).hexdigest()[:12]
  return os.path.join(c.cache_dir, f"{c.source}-{origin}-{digest}.json")


def _to_json(data: TaskData) -> dict:
  return dataclasses.asdict(data)


def _from_json(d: dict) -> TaskData:
  def split(v):
    return Retrieval(**v) if isinstance(v, dict) else v
  return TaskData(d["train"], split(d["dev"]), split(d["test"]), d["label_names"])


def builtin_task(c) -> TaskData:
  """A built-in code task, from the JSON cache when one exists (parsing takes ~a minute)."""
  path = _cache_path(c) if c.cache_dir else ""
  if path and os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        return _from_json(json.load(f))
    except (ValueError, KeyError, TypeError) as e:  # Bad JSON or UTF-8 are ValueErrors.
      logging.warning("Rebuilding the unreadable task cache %s (%s).", path, e)
  data = builtin_splits(c)
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # Several processes may build the same cache at once.
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(_to_json(data), f)
    os.replace(tmp, path)
  return data


# --- Files and TFDS ---------------------------------------------------------------------------

def _as_retrieval(pairs) -> Retrieval:
  docs = list(dict.fromkeys(p["doc"] for p in pairs))
  where = {d: i for i, d in enumerate(docs)}
  return Retrieval([p["query"] for p in pairs], docs, [where[p["doc"]] for p in pairs])


def _dev_share(train, c, place):
  """Without data.dev: (train, dev), dev the rows whose hashed row number is under dev_fraction."""
  parts = [code_tasks.hash_unit(f"finetune-dev:{i}") < c.dev_fraction for i in range(len(train))]
  dev = [x for x, d in zip(train, parts) if d]
  if not dev:
    raise ValueError(f"{place}: none of its {len(train)} training rows fell into the dev share "
                     f"(data.dev_fraction={c.dev_fraction}); give data.dev its own file or raise "
                     "data.dev_fraction.")
  return [x for x, d in zip(train, parts) if not d], dev


def _check_batch(n, c, place, train_steps, held_out):
  if train_steps and n < c.batch_size:
    held = f" after holding out data.dev_fraction={c.dev_fraction} for dev" if held_out else ""
    raise ValueError(f"{place}: {n} training rows{held}, fewer than one batch "
                     f"(data.batch_size={c.batch_size}); add rows or lower data.batch_size.")


def external_task(c, head: str, labels=(), train_steps: int = 1) -> TaskData:
  """A task from local files or a TFDS dataset; dev defaults to a hashed share of train. Every
  row, label and split size is checked here (`pretrain.finetune.task_files`)."""
  if c.source == "tfds":
    read = lambda key, split: task_files.tfds_split(c, key, split)  # noqa: E731
  else:
    read = task_files.read_split
  train_split = read("data.train", c.train or "train")
  train = task_files.examples(train_split, c, head)
  if c.dev:
    dev = task_files.examples(read("data.dev", c.dev), c, head)
  else:
    train, dev = _dev_share(train, c, train_split.place)
  test = task_files.examples(read("data.test", c.test), c, head) if c.test else dev
  _check_batch(len(train), c, train_split.place, train_steps, held_out=not c.dev)
  if head == "biencoder":
    plain = lambda items: [ex for _, ex in items]  # noqa: E731
    return TaskData(plain(train), _as_retrieval(plain(dev)), _as_retrieval(plain(test)))
  names = task_files.label_names(train, head, labels, train_split.label_names)
  out = [task_files.apply_labels(x, head, names, bool(labels)) for x in (train, dev, test)]
  task_files.check_classes(train, head, train_split.place)
  return TaskData(*out, names)


def _check_builtin(data: TaskData, c, head: str, train_steps: int) -> None:
  """A built-in task cut down by data.max_files still has a batch, dev and test rows, 2 classes."""
  where = f"data.source={c.source!r} (data.max_files={c.max_files})"
  _check_batch(len(data.train), c, where, train_steps, held_out=False)
  for name, split, also in (("dev", data.dev, "data.dev_fraction"),
                            ("test", data.test, "data.validation_fraction")):
    if not (split.queries if isinstance(split, Retrieval) else split):
      raise ValueError(f"{where}: the {name} split has no examples; raise data.max_files "
                       f"(0: every file) or {also}.")
  if head != "biencoder":
    task_files.check_classes([("", ex) for ex in data.train], head, where)


def load_task(c, head: str, *, labels=(), train_steps: int = 1) -> TaskData:
  """The examples of data config `c` for a task model with `head`, checked before anything
  compiles. `labels`: the declared class names (task.labels), () to infer them from the training
  split; `train_steps`: 0 (evaluation only) needs no training batch."""
  if c.source not in SOURCES:
    raise ValueError(f"Unknown data.source {c.source!r}; allowed: {', '.join(SOURCES)}.")
  if c.source not in BUILTIN:
    if head == "locate":
      raise ValueError(f"task.head='locate' points at a bug's edit site, which only data.source "
                       f"{', '.join(bug_tasks.BUG_TASKS)} record; data.source={c.source!r} needs "
                       "another task.head.")
    return external_task(c, head, labels, train_steps)
  expected = ("biencoder",) if c.source == "docstring_retrieval" else (
      ("sequence", "locate") if c.source in bug_tasks.BUG_TASKS else ("sequence",))
  if head not in expected:
    raise ValueError(f"data.source={c.source!r} needs task.head="
                     f"{' or '.join(map(repr, expected))}, got {head!r}.")
  if labels:
    raise ValueError(f"task.labels={','.join(labels)!r} but data.source={c.source!r} fixes its "
                     "own labels; set task.labels=''.")
  data = builtin_task(c)
  _check_builtin(data, c, head, train_steps)
  return data


# --- Rows ---------------------------------------------------------------------------------------

def _truncate_pair(a: list, b: list, budget: int) -> tuple[list, list]:
  """Longest-first truncation of two id lists to `budget` ids in all."""
  la, lb = len(a), len(b)
  while la + lb > budget:
    if la >= lb:
      la -= 1
    else:
      lb -= 1
  return a[:la], b[:lb]


def _fill_rows(tok: TaskTokenizer, id_rows: list[list[int]], seq_len: int,
               type_rows: list[list[int]] | None = None) -> dict[str, np.ndarray]:
  """input_ids, segment_ids (1 = token), positions, token_types of ready id lists (each at most
  seq_len ids, [CLS] and [SEP] included), [PAD]-padded; token types 0 unless given."""
  n = len(id_rows)
  out = {k: np.zeros((n, seq_len), np.int32) for k in
         ("input_ids", "segment_ids", "positions", "token_types")}
  out["input_ids"][:] = tok.pad_id
  for r, row in enumerate(id_rows):
    k = len(row)
    out["input_ids"][r, :k], out["segment_ids"][r, :k] = row, 1
    out["positions"][r, :k] = np.arange(k)
    if type_rows is not None:
      out["token_types"][r, :k] = type_rows[r]
  return out


def encode_rows(tok: TaskTokenizer, texts: list[str], texts_b: list[str] | None,
                seq_len: int) -> dict[str, np.ndarray]:
  """[CLS] a [SEP] (b [SEP]) rows: input_ids, segment_ids (1 = token), positions, token_types."""
  ids_a = tok.encode_batch(texts)
  ids_b = tok.encode_batch(texts_b) if texts_b is not None and any(texts_b) else None
  rows, types = [], []
  for r in range(len(texts)):
    b = ids_b[r] if ids_b is not None and texts_b[r] else None
    if b is None:
      a = ids_a[r][:seq_len - 2]
      rows.append([tok.cls_id, *a, tok.sep_id])
      types.append([0] * (len(a) + 2))
    else:
      a, b = _truncate_pair(ids_a[r], b, seq_len - 3)
      rows.append([tok.cls_id, *a, tok.sep_id, *b, tok.sep_id])
      types.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
  return _fill_rows(tok, rows, seq_len, types)


def _site_token(offsets, start: int) -> int | None:
  """Index of the first token ending after character `start` (the one holding the site's first
  character, or the next one where the tokenizer drops whitespace); None if there is none."""
  return next((j for j, (_, end) in enumerate(offsets) if end > start), None)


def encode_locations(tok, examples, seq_len) -> dict[str, np.ndarray]:
  """Bug-localisation rows [CLS] function [SEP] of bug-task examples ({"text", "label", "site"}):
  the label is the row position of the token holding the site's first character for a buggy
  function, 0 (the [CLS] position: no bug) for a correct one.

  The whole text is tokenized once, as for the sequence head, and the site's token found by the
  tokens' character spans: tokenizing the text in pieces split at the site would leave artifacts
  there (a dummy-prefix or space piece) in every row, marking the spot for the pointer. A row
  whose site token lies past the seq_len - 2 function tokens is dropped, with its partner (a
  correct row and the buggy one after it at the same site start), and counted in a log line: a
  truncated bug cannot be pointed at, and scoring it a miss would blame the encoder for the cut.
  """
  for i, e in enumerate(examples):
    if e.get("site") is None:
      raise ValueError(f"Example {i} has no edit site; task.head='locate' needs the rows of "
                       f"data.source {', '.join(bug_tasks.BUG_TASKS)}.")
  spans = tok.encode_spans([e["text"] for e in examples])
  sites = [_site_token(offsets, e["site"][0]) for e, (_, offsets) in zip(examples, spans)]
  past = [j is None or j >= seq_len - 2 for j in sites]
  for i in range(len(examples) - 1):
    a, b = examples[i], examples[i + 1]
    if (a["label"], b["label"]) == (0, 1) and a["site"][0] == b["site"][0]:
      past[i] = past[i + 1] = past[i] or past[i + 1]
  rows, labels = [], []
  for e, (ids, _), j, cut in zip(examples, spans, sites, past):
    if not cut:
      rows.append([tok.cls_id, *ids[:seq_len - 2], tok.sep_id])
      labels.append(1 + j if e["label"] else 0)
  if examples and not rows:
    raise ValueError(f"Every one of the {len(examples)} edit sites lies past data.seq_len="
                     f"{seq_len} tokens; raise data.seq_len.")
  if len(rows) < len(examples):
    logging.warning("Bug localisation: dropped %d of %d rows whose edit site lies past %d "
                    "tokens.", len(examples) - len(rows), len(examples), seq_len)
  out = _fill_rows(tok, rows, seq_len)
  out["labels"] = np.asarray(labels, np.int32)
  return out


def encode_classification(tok, examples, seq_len) -> dict[str, np.ndarray]:
  rows = encode_rows(tok, [e["text"] for e in examples],
                     [e.get("text_b", "") for e in examples], seq_len)
  rows["labels"] = np.asarray([e["label"] for e in examples], np.int32)
  return rows


def encode_tokens(tok, examples, seq_len) -> dict[str, np.ndarray]:
  """Word tags on the first piece of each word; -1 on other pieces, [CLS], [SEP], padding."""
  words = [w for e in examples for w in e["tokens"]]
  pieces = iter(tok.encode_batch(words))
  rows = []
  labels = np.full((len(examples), seq_len), -1, np.int32)
  for r, e in enumerate(examples):
    row, tags = [tok.cls_id], [-1]
    for tag in e["tags"]:
      ids = next(pieces)
      if ids and len(row) + len(ids) <= seq_len - 1:
        row += ids
        tags += [tag] + [-1] * (len(ids) - 1)
    rows.append(row + [tok.sep_id])
    labels[r, :len(tags)] = tags  # [SEP] and padding keep -1.
  out = _fill_rows(tok, rows, seq_len)
  out["labels"] = labels
  return out


def encode_pairs(tok, examples, seq_len) -> dict[str, np.ndarray]:
  """Bi-encoder rows: query_* and doc_* features."""
  q = encode_rows(tok, [e["query"] for e in examples], None, seq_len)
  d = encode_rows(tok, [e["doc"] for e in examples], None, seq_len)
  return {**{"query_" + k: v for k, v in q.items()}, **{"doc_" + k: v for k, v in d.items()}}


# --- Batches ------------------------------------------------------------------------------------

class _Gather:
  """Row indices -> a batch dict of those rows (a picklable grain map callable)."""

  def __init__(self, arrays):
    self.arrays = arrays

  def __call__(self, indices):
    batch = {k: v[indices] for k, v in self.arrays.items()}
    batch["weights"] = np.ones((len(indices),), np.float32)
    return batch


def train_iterator(arrays: dict, *, batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1):
  """Endless shuffled batches (reshuffled every epoch); a checkpointable grain iterator."""
  local = pipeline.local_batch_size(batch_size, process_count)
  n = len(next(iter(arrays.values())))
  ds = grain.MapDataset.range(n)[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"Process {process_index} got no training examples of {n}.")
  ds = ds.shuffle(seed=seed).repeat(None).batch(local, drop_remainder=True).map(_Gather(arrays))
  return iter(ds.to_iter_dataset())


def eval_batches(arrays: dict, batch_size: int, process_index: int = 0, process_count: int = 1):
  """Every row once, in order, in global batches of `batch_size` (the last padded, weight 0);
  each process yields its contiguous share of each batch."""
  local = pipeline.local_batch_size(batch_size, process_count)
  n = len(next(iter(arrays.values())))
  for start in range(0, n, batch_size):
    idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
    real = idx < n
    idx = np.where(real, idx, 0)
    batch = {k: v[idx] for k, v in arrays.items()}
    batch["weights"] = real.astype(np.float32)
    yield batch
