"""Pair and triplet files, as sentence-transformers and FlagEmbedding write them.

`data.name=pair_files` with `data.paths` (comma-separated globs of .jsonl, .csv or .parquet
files) trains the contrastive objective's `files` view on (query, positive[, negatives]) rows:

  FlagEmbedding   {"query": "...", "pos": ["..."], "neg": ["...", "..."]}   (JSON lines)
  s-transformers  columns anchor, positive[, negative] or negative_1, negative_2, ...
                  (also query / question / sentence1 and answer / document / sentence2)

`data.pair_fields="q,p,n"` names the query, positive and negatives fields when they are called
something else (an empty n: no negatives). A positive or negative field holds one text or a list
of texts (a row's positive is drawn from its list each time the row is used). `data.query_prefix`
and `data.doc_prefix` are prepended to every query and to every positive and negative (E5's
"query: " / "passage: ", or an instruction). A row with a missing field, an empty text or a value
of the wrong type is skipped, counted and reported with its file and line (the first few in the
warning, all in the count); a file with no usable row is an error naming it. Rows are split into
train and validation by a hash of their query (`data.validation_fraction`), so the rows of one
query never straddle the split.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
from collections.abc import Sequence

from pretrain.data import mixture

log = logging.getLogger(__name__)

NAME = "pair_files"
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
QUERY_NAMES = ("query", "anchor", "question", "sentence1")
POS_NAMES = ("pos", "positive", "answer", "document", "sentence2")
NEG_NAMES = ("neg", "negative", "negatives")
SHOWN_BAD_ROWS = 5


class FieldError(ValueError):
  """A file whose fields cannot be told apart: the whole file is unusable, not one row."""


@dataclasses.dataclass(frozen=True)
class PairRow:
  query: str
  pos: tuple[str, ...]
  neg: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Fields:
  """Field names: "" detects the query / positive / negatives among the known names."""
  query: str = ""
  pos: str = ""
  neg: str = ""

  @classmethod
  def parse(cls, value: str) -> "Fields":
    parts = [p.strip() for p in (value or "").split(",")] if value else []
    if parts and (len(parts) not in (2, 3) or not all(parts[:2])):
      raise ValueError(f"data.pair_fields={value!r}: give 'query,positive' or "
                       "'query,positive,negatives' field names, or '' to detect them.")
    return cls(*parts) if parts else cls()


def files_of(paths: str) -> list[str]:
  """Every file the comma-separated globs match, sorted; a glob matching none is an error."""
  out = []
  for pattern in [p.strip() for p in (paths or "").split(",") if p.strip()]:
    found = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
    if not found:
      raise FileNotFoundError(f"data.paths: {pattern!r} matches no file; give .jsonl, .csv or "
                              ".parquet pair files (comma-separated globs).")
    bad = [p for p in found if not p.endswith(SUFFIXES)]
    if bad:
      raise ValueError(f"data.paths: {bad[0]} is not a {', '.join(SUFFIXES)} file; pair files "
                       "are JSON lines, CSV or Parquet.")
    out += found
  if not out:
    raise ValueError("data.paths is empty; data.name=pair_files reads the pair files it names.")
  return out


def _records(path: str):
  """(line number, dict) of every row of one file (line: JSONL/CSV physical line, Parquet row)."""
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow.") from None
    for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
      yield i, row
  elif path.endswith(".csv"):
    with open(path, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      for row in reader:
        yield reader.line_num, row
  else:
    with open(path, encoding="utf-8") as f:
      for i, line in enumerate(f, 1):
        if line.strip():
          try:
            yield i, json.loads(line)
          except json.JSONDecodeError as e:
            yield i, ValueError(f"not valid JSON ({e.msg})")


def _detect(row: dict, fields: Fields, path: str) -> Fields:
  def pick(given, names, what):
    if given:
      return given
    found = [n for n in names if n in row]
    if not found and what != "negatives":
      raise FieldError(f"{path}: no {what} field among {', '.join(names)} (fields: "
                       f"{', '.join(map(str, row)) or 'none'}); name it with "
                       "--config.data.pair_fields=query,positive[,negatives].")
    return found[0] if found else ""
  neg = pick(fields.neg, NEG_NAMES, "negatives")
  if not neg and any(str(k).startswith("negative_") for k in row):
    neg = "negative_*"
  return Fields(pick(fields.query, QUERY_NAMES, "query"), pick(fields.pos, POS_NAMES, "positive"),
                neg)


def _texts(value, what: str) -> tuple[str, ...]:
  values = value if isinstance(value, list) else [value]
  if not values or not all(isinstance(v, str) for v in values):
    raise ValueError(f"the {what} must be a text or a list of texts, not {type(value).__name__}")
  if any(not v.strip() for v in values):
    raise ValueError(f"the {what} has an empty text")
  return tuple(values)


def _row(record: dict, fields: Fields, prefixes: tuple[str, str]) -> PairRow:
  if isinstance(record, Exception):
    raise record
  if not isinstance(record, dict):
    raise ValueError(f"a row must be an object, not {type(record).__name__}")
  for what, name in (("query", fields.query), ("positive", fields.pos)):
    if record.get(name) in (None, ""):
      raise ValueError(f"the {what} field {name!r} is missing or empty")
  query = _texts(record[fields.query], "query")
  if len(query) != 1:
    raise ValueError("the query must be one text")
  if fields.neg == "negative_*":
    negs = [record[k] for k in sorted(record, key=str) if str(k).startswith("negative_")
            and record[k] not in (None, "")]
    neg = tuple(t for v in negs for t in _texts(v, "negative"))
  else:
    value = record.get(fields.neg) if fields.neg else None
    neg = _texts(value, "negatives") if value not in (None, "", []) else ()
  q, d = prefixes
  return PairRow(q + query[0], tuple(d + t for t in _texts(record[fields.pos], "positive")),
                 tuple(d + t for t in neg))


def read(paths: str, fields: Fields = Fields(), query_prefix: str = "",
         doc_prefix: str = "") -> list[PairRow]:
  """Every usable row of the files; bad rows are counted and reported (see module docstring).

  Read once per process for the same arguments: a run opens the files for the tokenizer check,
  the train split and the validation split of every source."""
  files = tuple((p, os.path.getsize(p), os.path.getmtime(p)) for p in files_of(paths))
  return list(_read(files, fields, query_prefix, doc_prefix))


@functools.lru_cache(maxsize=16)
def _read(files: tuple, fields: Fields, query_prefix: str, doc_prefix: str) -> tuple:
  """`read` of (path, size, mtime) triples: a file that changes is read again."""
  rows, bad = [], []
  for path, _, _ in files:
    usable, detected = 0, None
    for line, record in _records(path):
      try:
        if detected is None and isinstance(record, dict):
          detected = _detect(record, fields, path)
        rows.append(_row(record, detected or fields, (query_prefix, doc_prefix)))
        usable += 1
      except FieldError:
        raise
      except ValueError as e:
        bad.append(f"{path}:{line}: {e}")
    if not usable:
      shown = f" ({bad[-1]})" if bad else " (it is empty)"
      raise ValueError(f"{path}: no usable (query, positive) row{shown}; fix the file or drop it "
                       "from data.paths.")
  if bad:
    log.warning("Skipped %d of %d pair rows: %s%s", len(bad), len(bad) + len(rows),
                "; ".join(bad[:SHOWN_BAD_ROWS]), " ..." if len(bad) > SHOWN_BAD_ROWS else "")
    print(f"Skipped {len(bad)} of {len(bad) + len(rows)} pair rows (first: {bad[0]}).",
          flush=True)
  return tuple(rows)


def split_of(row: PairRow, validation_fraction: float) -> str:
  """By a hash of the query alone: rows of one query (one per positive) share a split."""
  key = row.query.encode("utf-8")
  unit = int.from_bytes(hashlib.sha1(key).digest()[:8], "big") / 2.0**64
  return "validation" if unit < validation_fraction else "train"


class PairSource(Sequence):
  """One split's rows as a grain random-access source (items are PairRow)."""

  def __init__(self, rows: list[PairRow], description: str):
    self._rows, self._description = rows, description

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> PairRow:
    return self._rows[index]

  def texts(self):
    """Every query and positive: what a tokenizer is trained on."""
    for row in self._rows:
      yield row.query
      yield from row.pos

  def __repr__(self) -> str:
    return f"PairSource({self._description}, {len(self)} rows)"


def all_paths(data_config) -> str:
  """data.paths, or every source's globs of data.mixture (for the tokenizer and the checks)."""
  value = data_config.get("mixture", "")
  return ",".join(p for _, p, _ in mixture.parse(value)) if value else data_config.paths


def open_split(data_config, split: str, paths: str = "") -> PairSource:
  """One split of `paths` (default: `all_paths`) as a PairSource."""
  paths = paths or all_paths(data_config)
  rows = read(paths, Fields.parse(data_config.get("pair_fields", "")),
              data_config.get("query_prefix", ""), data_config.get("doc_prefix", ""))
  if split not in ("train", "validation"):
    raise ValueError(f"Split {split!r} does not exist in pair files; use train or validation.")
  chosen = [r for r in rows if split_of(r, data_config.validation_fraction) == split]
  if not chosen:
    raise ValueError(f"No pair row hashes to the {split!r} split of {paths} "
                     f"({len(rows)} rows); add rows or change data.validation_fraction.")
  return PairSource(chosen, f"{NAME}:{split}")


def dataset_id(data_config) -> str:
  """A stable identifier of the files (paths, sizes, modification times) for derived artefacts."""
  stats = [(p, os.path.getsize(p), int(os.path.getmtime(p)))
           for p in files_of(all_paths(data_config))]
  return f"{NAME}/{hashlib.sha1(json.dumps(stats).encode()).hexdigest()[:12]}"
