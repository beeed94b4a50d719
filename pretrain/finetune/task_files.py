"""Fine-tuning rows read from .jsonl / .csv files or a TFDS split, checked before anything compiles.

`read_split(key, globs)` reads the files one config key (data.train, data.dev, data.test) names;
every row keeps its place, `path:line` (the 1-based physical line of the file; for CSV the line the
row starts on), or `name[split]:index` for TFDS (`tfds_split`). `examples(split, c, head)` checks
each row's fields for the task head; `label_names` fixes the label vocabulary (declared in
task.labels, named by the dataset, or inferred from the training split) and `apply_labels` holds
every split to it. A problem is one line: the place, what is wrong, and the fix. A bad file's
content raises ValueError; a missing file FileNotFoundError naming the config key.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os

import numpy as np

SUFFIXES = (".jsonl", ".csv")
_LIST_NAMES = 20  # At most this many label names in a message.


@dataclasses.dataclass(frozen=True)
class Record:
  """One raw row and where it is (`path:line`); `unit` is how the row's keys are called."""
  where: str
  row: dict
  unit: str = "field"  # "column" for CSV


@dataclasses.dataclass
class Split:
  """The raw rows of one split; `place` names it in messages, `key` is its config key."""
  key: str
  place: str
  records: list
  label_names: list | None = None  # A TFDS ClassLabel's names.


def _kind(value) -> str:
  kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
           list: "a list", dict: "an object", type(None): "null"}
  return kinds.get(type(value), type(value).__name__)


def _show(value, limit=40) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _names(names) -> str:
  names = [str(n) if str(n).isprintable() else repr(n) for n in names]  # One line, always.
  more = f", ... ({len(names)} in all)" if len(names) > _LIST_NAMES else ""
  return ", ".join(names[:_LIST_NAMES]) + more


# --- Files ---------------------------------------------------------------------------------------

def split_paths(key: str, globs: str) -> list[str]:
  """The files comma-separated `globs` (config key `key`) match, sorted; each glob must match."""
  paths = set()
  for pattern in filter(None, (g.strip() for g in globs.split(","))):
    found = glob.glob(os.path.expanduser(pattern), recursive=True)
    if not found:
      raise FileNotFoundError(f"No file matches {pattern!r} in {key}={globs!r}; set {key} to "
                              ".jsonl or .csv files (comma-separated globs).")
    paths.update(found)
  if not paths:
    raise FileNotFoundError(f"{key} is empty; set it to .jsonl or .csv files (comma-separated "
                            "globs).")
  for path in sorted(paths):
    if os.path.isdir(path):
      raise FileNotFoundError(f"{key}={globs!r} matches the directory {path}, not a file; point "
                              f"{key} at the files in it (e.g. {os.path.join(path, '*.jsonl')}).")
    if not path.endswith(SUFFIXES):
      raise ValueError(f"{path}: only .jsonl and .csv files are read; rename it or leave it out "
                       f"of {key}.")
  return sorted(paths)


def _lines(path):
  """The file's lines, decoded one by one so that bad UTF-8 is named by its line."""
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                         f"{e.start + 1} of the line); save the file as UTF-8.") from None
      yield line[1:] if n == 1 and line.startswith("\ufeff") else line


def read_jsonl(path: str) -> list[Record]:
  """One JSON object per non-blank line."""
  out = []
  for n, line in enumerate(_lines(path), 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); fix the line or "
                       "remove it.") from None
    if not isinstance(row, dict):
      raise ValueError(f"{where}: {_kind(row)} where a JSON object is needed; write one "
                       '{"field": value, ...} object per line.')
    out.append(Record(where, row))
  return out


def read_csv(path: str) -> list[Record]:
  """Rows under the first non-blank line's column names; each named by the line it starts on."""
  reader = csv.reader(_lines(path))
  header, header_line, out = None, 0, []
  while True:
    start = reader.line_num + 1
    try:
      fields = next(reader)
    except StopIteration:
      return out
    except csv.Error as e:
      raise ValueError(f"{path}:{start}: not valid CSV ({e}); fix the line or remove it.") from None
    if not fields or (len(fields) == 1 and not fields[0].strip()):
      continue
    where = f"{path}:{start}"
    if header is None:
      header, header_line = [f.strip() for f in fields], start
      for i, name in enumerate(header):
        if not name:
          raise ValueError(f"{where}: the header's column {i + 1} has no name; name every "
                           "column.")
        if name in header[:i]:
          raise ValueError(f"{where}: the header names the column {name!r} twice; give every "
                           "column its own name.")
      continue
    if len(fields) != len(header):
      spans = (f" (the row runs to line {reader.line_num}: an unclosed quote?)"
               if reader.line_num > start else "")
      n = len(fields)
      raise ValueError(f"{where}: {n} field{'s' if n != 1 else ''} where the header (line "
                       f"{header_line}) has {len(header)}{spans}; quote fields that hold commas, "
                       "or give the row every column.")
    out.append(Record(where, dict(zip(header, fields)), "column"))


def read_split(key: str, globs: str) -> Split:
  """The rows of the files config key `key` (e.g. "data.dev") names, in sorted file order."""
  paths = split_paths(key, globs)
  records = []
  for path in paths:
    records += read_jsonl(path) if path.endswith(".jsonl") else read_csv(path)
  place = paths[0] if len(paths) == 1 else f"{key}={globs!r} ({len(paths)} files)"
  return Split(key, place, records)


# --- TFDS ---------------------------------------------------------------------------------------

def _plain(value):
  """TFDS values as JSON-like Python: bytes -> str, numpy scalars and arrays -> numbers, lists."""
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, list):
    return [_plain(v) for v in value]
  return value


def tfds_split(c, key: str, split: str) -> Split:
  """The rows of a prepared TFDS split; a ClassLabel label field's integers become its names."""
  from pretrain.data import sources  # pylint: disable=import-outside-toplevel
  builder = sources.get_builder(c)
  if split.split("[", 1)[0] not in builder.info.splits:
    raise ValueError(f"Split {split!r} ({key}) does not exist in {c.name!r}; available: "
                     f"{', '.join(sorted(builder.info.splits))}.")
  data = builder.as_data_source(split=split)
  features = builder.info.features
  feature = features[c.label_field] if c.label_field in features.keys() else None
  names = list(feature.names) if getattr(feature, "names", None) else None
  getitems = getattr(data, "__getitems__", None)
  raw = getitems(range(len(data))) if getitems else [data[i] for i in range(len(data))]
  place = f"{c.name}[{split}]"
  records = []
  for i, r in enumerate(raw):
    row = {k: _plain(v) for k, v in r.items()}
    label = row.get(c.label_field)
    if names and isinstance(label, int) and label >= 0:
      if label >= len(names):
        raise ValueError(f"{place}:{i}: label {label} is outside the dataset's {len(names)} "
                         "classes; the prepared dataset is damaged: prepare it again.")
      row[c.label_field] = names[label]
    records.append(Record(f"{place}:{i}", row))
  return Split(key, place, records, names)


# --- Fields -------------------------------------------------------------------------------------

def _get(rec: Record, name: str, role: str, key: str):
  """row[name], which must be there; `role` and the config key `key` name it in the message."""
  if name not in rec.row:
    raise ValueError(f"{rec.where}: no {role} {rec.unit} {name!r} (the row has: "
                     f"{_names(sorted(rec.row)) or 'nothing'}); give every row one, or set "
                     f"{key} to the {rec.unit} that holds it.")
  return rec.row[name]


def _text(rec: Record, name: str, role: str, key: str) -> str:
  value = _get(rec, name, role, key)
  if value is None:
    raise ValueError(f"{rec.where}: the {role} {rec.unit} {name!r} is null; give the row its "
                     "text or drop the row.")
  if not isinstance(value, str):
    raise ValueError(f"{rec.where}: the {role} {rec.unit} {name!r} holds {_kind(value)} "
                     f"({_show(value)}), not a string; write the text as a string.")
  if not value.strip():
    raise ValueError(f"{rec.where}: the {role} {rec.unit} {name!r} is empty; give the row its "
                     "text or drop the row.")
  return value


def _label_value(where: str, what: str, value):
  """A label as str or int (booleans as 0/1); `what` names it ("the label column 'y'")."""
  if value is None or (isinstance(value, str) and not value.strip()):
    empty = "null" if value is None else "empty"
    raise ValueError(f"{where}: {what} is {empty}; give every row a label or drop the row.")
  if isinstance(value, bool):
    return int(value)
  if not isinstance(value, (str, int)):
    raise ValueError(f"{where}: {what} holds {_kind(value)} ({_show(value)}), not a string or an "
                     "integer; write labels as strings or integers 0..C-1 (fine-tuning has no "
                     "regression head).")
  return value.strip() if isinstance(value, str) else value


def _list(rec: Record, name: str, role: str, key: str) -> list:
  value = _get(rec, name, role, key)
  if not isinstance(value, list):
    raise ValueError(f"{rec.where}: the {role} {rec.unit} {name!r} holds {_kind(value)}, not a "
                     "list; token tasks read JSONL rows with a list of words and a list of tags.")
  if not value:
    raise ValueError(f"{rec.where}: the {role} {rec.unit} {name!r} is an empty list; give the "
                     f"row its {role} or drop the row.")
  return value


def _token_example(rec: Record, c) -> dict:
  tokens = _list(rec, c.tokens_field, "tokens", "data.tokens_field")
  tags = _list(rec, c.tags_field, "tags", "data.tags_field")
  if len(tokens) != len(tags):
    raise ValueError(f"{rec.where}: {len(tokens)} tokens in {c.tokens_field!r} but {len(tags)} "
                     f"tags in {c.tags_field!r}; give every token one tag.")
  for i, word in enumerate(tokens):
    if not isinstance(word, str) or not word.strip():
      what = "empty" if isinstance(word, str) else f"{_kind(word)} ({_show(word)})"
      raise ValueError(f"{rec.where}: token {i + 1} of {c.tokens_field!r} is {what}, not a word; "
                       "write every token as a non-empty string.")
  return {"tokens": tokens, "tags": [_label_value(rec.where, f"tag {i + 1} of {c.tags_field!r}",
                                                  t) for i, t in enumerate(tags)]}


def _example(rec: Record, c, head: str) -> dict | None:
  """The example of one row for `head`; None for an unlabelled row (a negative integer label)."""
  if head == "biencoder":
    return {"query": _text(rec, c.query_field, "query", "data.query_field"),
            "doc": _text(rec, c.doc_field, "doc", "data.doc_field")}
  if head == "token":
    return _token_example(rec, c)
  label = _label_value(rec.where, f"the label {rec.unit} {c.label_field!r}",
                       _get(rec, c.label_field, "label", "data.label_field"))
  if isinstance(label, int) and label < 0:
    return None  # Unlabelled (e.g. GLUE test splits mark every row -1).
  text_b = (_text(rec, c.text_b_field, "second text", "data.text_b_field")
            if c.text_b_field else "")
  return {"text": _text(rec, c.text_field, "text", "data.text_field"), "text_b": text_b,
          "label": label}


def examples(split: Split, c, head: str) -> list[tuple[str, dict]]:
  """(place, example) of every labelled row of `split`; a split without one is an error."""
  out = []
  for rec in split.records:
    ex = _example(rec, c, head)
    if ex is not None:
      out.append((rec.where, ex))
  if not out:
    why = (f"all {len(split.records)} rows have a negative label (unlabelled)"
           if split.records else "no rows")
    raise ValueError(f"{split.place}: {why}; {split.key} needs at least one labelled row.")
  return out


# --- Labels ---------------------------------------------------------------------------------------

def _raw_labels(items, head):
  """(place, raw label) of every label in `items` ((place, example) pairs); tags for token tasks."""
  if head == "token":
    return [(w, t) for w, ex in items for t in ex["tags"]]
  return [(w, ex["label"]) for w, ex in items]


def label_names(train, head: str, declared=(), dataset_names=None) -> list[str]:
  """The class names in index order: declared (task.labels), the dataset's, or the training
  split's (integers 0..C-1 when every label is one, every class present; else sorted strings)."""
  if declared:
    return list(declared)
  if dataset_names:
    return list(dataset_names)
  raw = _raw_labels(train, head)
  if all(isinstance(v, int) for _, v in raw):
    where, top = max(raw, key=lambda wv: wv[1])
    absent = sorted(set(range(top + 1)) - {v for _, v in raw})
    if absent:
      raise ValueError(f"{where}: label {top} makes {top + 1} classes but no training row has "
                       f"{_names(absent)}; integer labels are the classes 0..C-1: fix the row, or "
                       "declare the classes in task.labels.")
    return [str(i) for i in range(top + 1)]
  return sorted({str(v) for _, v in raw})


def apply_labels(items, head: str, names, declared: bool) -> list[dict]:
  """Examples with class indices in place of raw labels; any label outside `names` is an error."""
  index = {name: i for i, name in enumerate(names)}
  what = "tag" if head == "token" else "label"

  def look(where, value):
    if str(value) in index:
      return index[str(value)]
    if declared:
      raise ValueError(f"{where}: {what} {_show(value)} is not one of task.labels "
                       f"({_names(names)}); fix the row or add the {what} to task.labels.")
    raise ValueError(f"{where}: {what} {_show(value)} does not occur in the training split "
                     f"(training {what}s: {_names(names)}); fix the row, or declare every "
                     f"{what} in task.labels.")

  if head == "token":
    return [{**ex, "tags": [look(w, t) for t in ex["tags"]]} for w, ex in items]
  return [{**ex, "label": look(w, ex["label"])} for w, ex in items]


def check_classes(train, head: str, place: str) -> None:
  """A classifier's training split holds at least two classes."""
  present = {str(v) for _, v in _raw_labels(train, head)}
  if len(present) < 2:
    what, key = ("tag", "data.tags_field") if head == "token" else ("label", "data.label_field")
    raise ValueError(f"{place}: every training row has the {what} {_show(next(iter(present)))}; "
                     "a classifier needs at least 2 classes in the training split: add rows of "
                     f"another class, or check {key}.")
