"""Fine-tuning datasets: built-in code tasks, local JSONL/CSV files, TFDS catalog datasets.

`load_task(data_config, head)` returns a `TaskData` of plain Python examples; `encode_*` turn
them into fixed-length int32 rows ([CLS] a [SEP] (b [SEP]), padding, see
`pretrain.finetune.heads`), and `train_iterator` / `eval_batches` batch those rows.

Sources (`data_config.source`):
  exception_type       the masked exception name of an `except Name:` clause, among the
                       `num_exception_types` most frequent (`pretrain.finetune.code_tasks`);
  docstring_match      (docstring, code) pairs: label 1 for the function's own code, 0 for
                       another function's (one of each per documented function);
  docstring_retrieval  (docstring, code) pairs for a bi-encoder; dev/test are retrieval sets
                       (every query against every function of the split);
  files                local .jsonl / .csv files (`train`, `dev`, `test`: comma-separated globs);
  tfds                 a prepared TFDS dataset by catalog name (`name`, e.g. "glue/sst2"), with
                       `train` / `dev` / `test` as split names.
Built-in tasks never leave the machine: train and dev examples come from the pretraining "train"
files of the interpreter's standard library (split again by a hash of the file path, so no
function or try statement is in both), test examples from the held-out files pretraining never
saw (`python_code.heldout_files("heldout")`). They are cached as JSON under `cache_dir`.
Where dev is not given, it is `dev_fraction` of the training rows (by a hash of the row number).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import sys

import grain
import numpy as np

from pretrain.finetune import code_tasks
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
      max_files=c.max_files or None, num_classes=c.num_exception_types, seed=c.seed)
  as_split = lambda v: Retrieval(*v) if isinstance(v, tuple) else v  # noqa: E731
  return TaskData(d["train"], as_split(d["dev"]), as_split(d["test"]), d["label_names"])


def _cache_path(c) -> str:
  key = json.dumps({k: c[k] for k in ("source", "validation_fraction", "dev_fraction",
                                      "max_files", "num_exception_types", "seed")},
                   sort_keys=True)
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
    with open(path, encoding="utf-8") as f:
      return _from_json(json.load(f))
  data = builtin_splits(c)
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(_to_json(data), f)
    os.replace(path + ".tmp", path)
  return data


# --- Files and TFDS ---------------------------------------------------------------------------

def read_records(globs: str) -> list[dict]:
  """Rows of the .jsonl / .csv files matched by comma-separated `globs`, in sorted file order."""
  paths = sorted({p for g in globs.split(",") if g.strip()
                  for p in glob.glob(os.path.expanduser(g.strip()), recursive=True)})
  if not paths:
    raise FileNotFoundError(f"No file matches {globs!r}; set data.train / data.dev / "
                            "data.test to .jsonl or .csv paths (comma-separated globs).")
  rows = []
  for path in paths:
    with open(path, encoding="utf-8", newline="") as f:
      if path.endswith(".jsonl"):
        rows += [json.loads(line) for line in f if line.strip()]
      elif path.endswith(".csv"):
        rows += list(csv.DictReader(f))
      else:
        raise ValueError(f"{path}: only .jsonl and .csv files are read.")
  return rows


def _tfds_records(c, split: str) -> tuple[list[dict], list | None]:
  """(rows, label names of a ClassLabel feature or None) of a prepared TFDS split."""
  from pretrain.data import sources  # pylint: disable=import-outside-toplevel
  builder = sources.get_builder(c)
  if split.split("[", 1)[0] not in builder.info.splits:
    raise ValueError(f"Split {split!r} does not exist in {c.name!r}; available: "
                     f"{sorted(builder.info.splits)}.")
  records = builder.as_data_source(split=split)
  features = builder.info.features
  feature = features[c.label_field] if c.label_field in features.keys() else None
  names = list(feature.names) if getattr(feature, "names", None) else None
  decode = lambda v: v.decode("utf-8") if isinstance(v, bytes) else v  # noqa: E731
  getitems = getattr(records, "__getitems__", None)
  raw = getitems(range(len(records))) if getitems else [records[i] for i in range(len(records))]
  rows = [{k: v.tolist() if isinstance(v, np.ndarray) else decode(v) for k, v in r.items()}
          for r in raw]
  return rows, names


def _field(row, name, where):
  if name not in row:
    raise KeyError(f"{where}: a row has no field {name!r} (fields: {sorted(row)}); set the "
                   "data.*_field options.")
  return row[name]


def _labelled(rows, c, head, where):
  """Raw rows -> examples of `head`, labels still raw (str or int)."""
  out = []
  for row in rows:
    if head == "biencoder":
      out.append({"query": str(_field(row, c.query_field, where)),
                  "doc": str(_field(row, c.doc_field, where))})
    elif head == "token":
      tokens, tags = _field(row, c.tokens_field, where), _field(row, c.tags_field, where)
      if isinstance(tokens, str) or isinstance(tags, str) or len(tokens) != len(tags):
        raise ValueError(f"{where}: token tasks need lists of equal length in "
                         f"{c.tokens_field!r} and {c.tags_field!r} (JSONL, not CSV).")
      out.append({"tokens": [str(t) for t in tokens], "tags": list(tags)})
    else:
      label = _field(row, c.label_field, where)
      if isinstance(label, (int, np.integer)) and label < 0:
        continue  # Unlabelled rows (e.g. GLUE test splits).
      out.append({"text": str(_field(row, c.text_field, where)),
                  "text_b": str(row[c.text_b_field]) if c.text_b_field else "",
                  "label": label})
  if not out:
    raise ValueError(f"{where}: no labelled examples.")
  return out


def _label_index(train, head, names):
  """Label names and raw label -> index: given names, ints as they are, or sorted strings."""
  if head == "token":
    raw = [t for ex in train for t in ex["tags"]]
  else:
    raw = [ex["label"] for ex in train]
  if names is None:
    if all(isinstance(v, (int, np.integer)) for v in raw):
      names = [str(i) for i in range(int(max(raw)) + 1)]
      return names, {i: i for i in range(len(names))}
    names = sorted({str(v) for v in raw})
  index = {name: i for i, name in enumerate(names)}
  index.update({i: i for i in range(len(names))})
  return names, index


def _apply_labels(examples, head, index, where):
  def look(v):
    key = v if isinstance(v, (int, np.integer)) else str(v)
    if key not in index:
      raise ValueError(f"{where}: label {v!r} does not occur in the training split.")
    return int(index[key])
  if head == "token":
    return [{**ex, "tags": [look(t) for t in ex["tags"]]} for ex in examples]
  return [{**ex, "label": look(ex["label"])} for ex in examples]


def _as_retrieval(pairs) -> Retrieval:
  docs = list(dict.fromkeys(p["doc"] for p in pairs))
  where = {d: i for i, d in enumerate(docs)}
  return Retrieval([p["query"] for p in pairs], docs, [where[p["doc"]] for p in pairs])


def external_task(c, head: str) -> TaskData:
  """A task from local files or a TFDS dataset; dev defaults to a hashed share of train."""
  names = None
  if c.source == "tfds":
    read = lambda split: _tfds_records(c, split)  # noqa: E731
    train_rows, names = read(c.train or "train")
  else:
    read = lambda globs: (read_records(globs), None)  # noqa: E731
    train_rows, _ = read(c.train)
  train = _labelled(train_rows, c, head, f"{c.source}:{c.train or 'train'}")
  if c.dev:
    dev = _labelled(read(c.dev)[0], c, head, f"{c.source}:{c.dev}")
  else:
    parts = [code_tasks.hash_unit(f"finetune-dev:{i}") < c.dev_fraction
             for i in range(len(train))]
    dev = [ex for ex, d in zip(train, parts) if d]
    train = [ex for ex, d in zip(train, parts) if not d]
  test = _labelled(read(c.test)[0], c, head, f"{c.source}:{c.test}") if c.test else dev
  if head == "biencoder":
    return TaskData(train, _as_retrieval(dev), _as_retrieval(test))
  names, index = _label_index(train, head, names)
  return TaskData(*(_apply_labels(x, head, index, f"{c.source}:{s}")
                    for x, s in ((train, "train"), (dev, "dev"), (test, "test"))), names)


def load_task(c, head: str) -> TaskData:
  """The examples of `data_config` c for a task model with `head`."""
  if c.source not in SOURCES:
    raise ValueError(f"Unknown data.source {c.source!r}; allowed: {', '.join(SOURCES)}.")
  if c.source in BUILTIN:
    expected = "biencoder" if c.source == "docstring_retrieval" else "sequence"
    if head != expected:
      raise ValueError(f"data.source={c.source!r} needs task.head={expected!r}, "
                       f"got {head!r}.")
    return builtin_task(c)
  return external_task(c, head)


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


def encode_rows(tok: TaskTokenizer, texts: list[str], texts_b: list[str] | None,
                seq_len: int) -> dict[str, np.ndarray]:
  """[CLS] a [SEP] (b [SEP]) rows: input_ids, segment_ids (1 = token), positions, token_types."""
  ids_a = tok.encode_batch(texts)
  ids_b = tok.encode_batch(texts_b) if texts_b is not None and any(texts_b) else None
  n = len(texts)
  out = {k: np.zeros((n, seq_len), np.int32) for k in
         ("input_ids", "segment_ids", "positions", "token_types")}
  out["input_ids"][:] = tok.pad_id
  for r in range(n):
    b = ids_b[r] if ids_b is not None and texts_b[r] else None
    if b is None:
      a = ids_a[r][:seq_len - 2]
      row, types = [tok.cls_id, *a, tok.sep_id], [0] * (len(a) + 2)
    else:
      a, b = _truncate_pair(ids_a[r], b, seq_len - 3)
      row = [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
      types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    k = len(row)
    out["input_ids"][r, :k] = row
    out["segment_ids"][r, :k] = 1
    out["positions"][r, :k] = np.arange(k)
    out["token_types"][r, :k] = types
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
  n = len(examples)
  out = {k: np.zeros((n, seq_len), np.int32) for k in
         ("input_ids", "segment_ids", "positions", "token_types")}
  out["input_ids"][:] = tok.pad_id
  labels = np.full((n, seq_len), -1, np.int32)
  for r, e in enumerate(examples):
    row, tags = [tok.cls_id], [-1]
    for tag in e["tags"]:
      ids = next(pieces)
      if ids and len(row) + len(ids) <= seq_len - 1:
        row += ids
        tags += [tag] + [-1] * (len(ids) - 1)
    row.append(tok.sep_id)
    tags.append(-1)
    k = len(row)
    out["input_ids"][r, :k], out["segment_ids"][r, :k] = row, 1
    out["positions"][r, :k], labels[r, :k] = np.arange(k), tags
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
