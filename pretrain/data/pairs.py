"""grain pipelines of contrastive examples: chunks to crop, code pairs, ICT pairs.

Every view turns one document into zero or more fixed-shape examples (`Examples`, a grain
random map, so its random choices are a pure function of (seed, position in the epoch-repeated
dataset) and run in grain's reader threads); `_ExampleIterator` then gathers the examples of
consecutive documents into segments, shuffles each segment, and cuts batches. Its checkpoint is
(parent state at the segment's first document, segment number, rows already taken): restoring
replays one segment, exactly as `pipeline.py`'s packer does.

Views (`view=`):
  crop       one row per chunk of seq_len - 2 tokens: {"input_ids", "segment_ids", "positions"},
             "[CLS] chunk [SEP]" + padding; the two crops are made on device
             (`objectives.views`). A document is cut into consecutive chunks, as Contriever does.
  docstring  Python functions with a docstring: query = its first paragraph (at least 4 words),
             document = the function without its docstring, both as `python_code` extracts them
             for the docstring -> code retrieval benchmark (the analogue of BFS's first section
             <-> a passage of the same page).
  same_file  a function <-> another function of the same file, drawn at random (a file with
             fewer than two functions gives nothing); docstrings removed as above.
  Functions whose code is only the `def` line once the docstring is gone are left out.
  ccp        contrastive context prediction (Wu et al. 2022): the document's lines (or sentences,
             `ict_unit`) of at least MIN_QUERY_TOKENS tokens are centres; each is paired with a
             unit drawn from the `ccp_window` such units on either side of it (the paper's
             window around the centre sentence; shorter lines are skipped, not counted); the
             centre is cut at query_len, the context at seq_len.
  files      the rows of pair files (`data.name=pair_files`, pretrain/data/pair_files.py): the
             query, one of its positives (drawn per use) and, with num_negatives = k > 0, k of
             its hard negatives (drawn without replacement; a row with fewer gets empty rows,
             which the objective masks out) as {"neg_ids", "neg_segment_ids", "neg_positions"}
             [local_batch, k * seq_len] (row-major: negative j is columns j*seq_len ...).
  ict        Inverse Cloze Task (ORQA): the document is cut into blocks of whole lines (or
             sentences) of at most seq_len - 2 tokens; per block a random line of at least
             MIN_QUERY_TOKENS tokens is the query and is removed from the block with probability
             `ict_remove_rate` (ORQA: 0.9). Lines are tokenized one by one, so a block's ids are
             the concatenation of its lines' ids.
Pair views yield {"query_ids", "query_segment_ids", "query_positions"} [local_batch, query_len]
and {"doc_ids", "doc_segment_ids", "doc_positions"} [local_batch, seq_len]; a row is
"[CLS] text [SEP]" + padding (segment id 1 on its tokens, 0 on padding), longer texts are cut.

Finite data (evaluation: num_epochs=1) pads the last partial batch with all-padding rows, which
the objective masks out; repeating data never ends.
"""

from __future__ import annotations

import os
import re

import grain
import numpy as np

from pretrain.data import pipeline, python_code, tokenizer as tokenizer_lib

VIEWS = ("crop", "docstring", "same_file", "ict", "files", "ccp")
ICT_UNITS = ("line", "sentence")
MIN_QUERY_TOKENS = 4
CHUNK_KEYS = ("input_ids", "segment_ids", "positions")
PAIR_KEYS = ("query_ids", "query_segment_ids", "query_positions",
             "doc_ids", "doc_segment_ids", "doc_positions")
NEG_KEYS = ("neg_ids", "neg_segment_ids", "neg_positions")


def features(view: str, num_negatives: int = 0) -> tuple[str, ...]:
  if view == "crop":
    return CHUNK_KEYS
  return PAIR_KEYS + (NEG_KEYS if view == "files" and num_negatives else ())


def lengths(keys, seq_len: int, query_len: int, num_negatives: int) -> dict:
  """Row length per feature: queries query_len, documents seq_len, negatives k x seq_len."""
  return {k: query_len if k.startswith("query") else
          num_negatives * seq_len if k.startswith("neg") else seq_len for k in keys}


def _has_body(code: str) -> bool:
  """Whether a function's code (docstring removed) has more than its `def` line."""
  return sum(1 for line in code.splitlines() if line.strip()) > 1


def _units(text: str, unit: str) -> list[str]:
  """Lines (blank lines join the line before) or sentences, concatenating back to `text`."""
  if unit == "sentence":
    parts = re.split(r"(?<=[.!?])(\s+)", text)
    units = ["".join(parts[i:i + 2]) for i in range(0, len(parts), 2)]
  else:
    units = []
    for line in text.splitlines(keepends=True):
      if units and not line.strip():
        units[-1] += line
      else:
        units.append(line)
  return [u for u in units if u]


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
  if not texts:
    return []
  if hasattr(tokenizer, "encode_batch"):
    return [list(ids) for ids in tokenizer.encode_batch(texts)]
  return [list(tokenizer.encode(t)) for t in texts]


def special_ids(tokenizer) -> tuple[int, int]:
  """([CLS], [SEP]) ids: the tokenizer's own when it has them, else sentencepiece's reserved."""
  return (int(getattr(tokenizer, "cls_id", tokenizer_lib.CLS_ID)),
          int(getattr(tokenizer, "sep_id", tokenizer_lib.SEP_ID)))


def rows(token_lists, length: int, cls_id: int, sep_id: int) -> np.ndarray:
  """int32 [3, n, length]: ids, segment ids, positions of "[CLS] ids [SEP]" + padding rows."""
  out = np.zeros((3, len(token_lists), length), np.int32)
  for r, ids in enumerate(token_lists):
    row = [cls_id, *ids[:length - 2], sep_id]
    out[0, r, :len(row)] = row
    out[1, r, :len(row)] = 1
    out[2, r, :len(row)] = np.arange(len(row))
  return out


class Examples:
  """Document text -> dict of [n, ...] int32 arrays (a grain random-map callable)."""

  def __init__(self, tokenizer, view: str, seq_len: int, query_len: int,
               ict_remove_rate: float, ict_unit: str, num_negatives: int = 0,
               ccp_window: int = 2):
    self.tokenizer, self.view, self.num_negatives = tokenizer, view, num_negatives
    self.ccp_window = ccp_window
    self.seq_len, self.query_len = seq_len, query_len
    self.ict_remove_rate, self.ict_unit = ict_remove_rate, ict_unit
    self.cls_id, self.sep_id = special_ids(tokenizer)

  def _pairs(self, queries, docs) -> dict:
    q = rows(queries, self.query_len, self.cls_id, self.sep_id)
    d = rows(docs, self.seq_len, self.cls_id, self.sep_id)
    return dict(zip(PAIR_KEYS, [*q, *d]))

  def __call__(self, text: str, rng: np.random.Generator) -> dict:
    body = self.seq_len - 2
    if self.view == "crop":
      ids = _encode_all(self.tokenizer, [text])[0]
      chunks = [ids[i:i + body] for i in range(0, len(ids), body)]
      return dict(zip(CHUNK_KEYS, rows(chunks, self.seq_len, self.cls_id, self.sep_id)))
    if self.view == "ict":
      return self._ict(text, rng)
    if self.view == "files":
      return self._file_row(text, rng)
    if self.view == "ccp":
      return self._ccp(text, rng)
    funcs = python_code.function_pairs([("", text)])
    funcs = [f for f in funcs if _has_body(f["code"])]
    if self.view == "docstring":
      chosen = [(q, f["code"]) for f in funcs
                if (q := python_code.docstring_query(f["docstring"]))]
    else:  # same_file
      n = len(funcs) if len(funcs) > 1 else 0
      chosen = [(funcs[i]["code"], funcs[(i + rng.integers(1, n)) % n]["code"])
                for i in range(n)]
    texts = [q for q, _ in chosen] + [d for _, d in chosen]
    ids = _encode_all(self.tokenizer, texts)
    return self._pairs(ids[:len(chosen)], ids[len(chosen):])

  def _file_row(self, row, rng: np.random.Generator) -> dict:
    """One pair-file row (a pair_files.PairRow) as one example, with its hard negatives."""
    k = self.num_negatives
    negs = [row.neg[i] for i in sorted(rng.permutation(len(row.neg))[:k])] if k else []
    ids = _encode_all(self.tokenizer, [row.query, row.pos[rng.integers(len(row.pos))], *negs])
    out = self._pairs(ids[:1], ids[1:2])
    if k:
      n = np.zeros((3, k, self.seq_len), np.int32)  # Missing negatives stay empty rows.
      n[:, :len(negs)] = rows(ids[2:], self.seq_len, self.cls_id, self.sep_id)
      out.update(zip(NEG_KEYS, n.reshape(3, 1, k * self.seq_len)))
    return out

  def _ccp(self, text: str, rng: np.random.Generator) -> dict:
    units = [u for u in _encode_all(self.tokenizer, _units(text, self.ict_unit))
             if len(u) >= MIN_QUERY_TOKENS]
    w, queries, contexts = self.ccp_window, [], []
    for i, centre in enumerate(units):
      around = [j for j in range(max(0, i - w), min(len(units), i + w + 1)) if j != i]
      if around:
        queries.append(centre)
        contexts.append(units[around[rng.integers(len(around))]])
    return self._pairs(queries, contexts)

  def _ict(self, text: str, rng: np.random.Generator) -> dict:
    body = self.seq_len - 2
    units = _encode_all(self.tokenizer, _units(text, self.ict_unit))
    blocks, current, size = [], [], 0
    for ids in units:
      if current and size + len(ids) > body:
        blocks.append(current)
        current, size = [], 0
      current.append(ids[:body])
      size += min(len(ids), body)
    if current:
      blocks.append(current)
    queries, docs = [], []
    for block in blocks:
      eligible = [i for i, ids in enumerate(block) if len(ids) >= MIN_QUERY_TOKENS]
      if len(block) < 2 or not eligible:
        continue
      q = eligible[rng.integers(len(eligible))]
      remove = rng.random() < self.ict_remove_rate
      queries.append(block[q])
      docs.append([t for i, ids in enumerate(block) if not (remove and i == q) for t in ids])
    return self._pairs(queries, docs)


def _empty(keys, lengths) -> dict:
  return {k: np.zeros((0, lengths[k]), np.int32) for k in keys}


class _ExampleIterator(grain.DatasetIterator):
  """Segments of examples from consecutive documents -> shuffled batches; see module docstring."""

  def __init__(self, parent, cfg: dict):
    super().__init__(parent)
    self._cfg = cfg
    self._mark = parent.get_state()
    self._segment = 0
    self._rows = _empty(cfg["keys"], cfg["lengths"])
    self._taken = 0
    self._built = False
    self._exhausted = False

  def _build_segment(self) -> None:
    cfg = self._cfg
    self._mark = self._parent.get_state()
    parts, n, docs = [], 0, 0
    while n < cfg["segment_rows"]:
      try:
        doc = next(self._parent)
      except StopIteration:
        self._exhausted = True
        break
      docs += 1
      count = len(doc[cfg["keys"][0]])
      if count:
        parts.append(doc)
        n += count
      elif n == 0 and docs >= cfg["max_empty_documents"]:
        raise ValueError(
            f"{docs} documents in a row gave no {cfg['view']!r} examples (e.g. no "
            "Python functions with docstrings); choose a view that fits the corpus "
            "(objective.view) or another corpus.")
    rows_ = ({k: np.concatenate([p[k] for p in parts]) for k in cfg["keys"]} if parts
             else _empty(cfg["keys"], cfg["lengths"]))
    if cfg["shuffle"] and n:
      perm = np.random.default_rng([cfg["seed"], self._segment]).permutation(n)
      rows_ = {k: v[perm] for k, v in rows_.items()}
    self._rows, self._taken, self._built = rows_, 0, True

  def _take(self, n: int) -> dict:
    parts, need = [], n
    while need:
      if not self._built:
        self._build_segment()
      available = len(self._rows[self._cfg["keys"][0]])
      if self._taken == available:
        if self._exhausted:
          break
        self._segment, self._built = self._segment + 1, False
        continue
      part = {k: v[self._taken:self._taken + need] for k, v in self._rows.items()}
      got = len(part[self._cfg["keys"][0]])
      self._taken += got
      need -= got
      parts.append(part)
    if not parts:
      return _empty(self._cfg["keys"], self._cfg["lengths"])
    return {k: np.concatenate([p[k] for p in parts]) for k in self._cfg["keys"]}

  def take_rows(self, n: int) -> dict:
    """The next `n` examples (fewer only at the end of finite data): a mixture's share."""
    return self._take(n)

  def __next__(self) -> dict:
    cfg = self._cfg
    batch = cfg["local_batch"]
    rows_ = self._take(batch)
    got = len(rows_[cfg["keys"][0]])
    if got == 0 or (got < batch and not cfg["pad_last"]):
      raise StopIteration
    if got < batch:
      rows_ = {k: np.concatenate([v, np.zeros((batch - got, v.shape[1]), np.int32)])
               for k, v in rows_.items()}
    return {k: np.ascontiguousarray(v) for k, v in rows_.items()}

  def get_state(self) -> dict:
    return {"mark": self._mark, "segment": self._segment, "taken": self._taken}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["mark"])
    self._exhausted = False
    self._segment = state["segment"]
    self._build_segment()  # Replays one segment of documents.
    self._taken = state["taken"]


class _ExampleIterDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, **cfg):
    super().__init__(parent)
    self._cfg = cfg

  def __iter__(self) -> _ExampleIterator:
    return _ExampleIterator(self._parent.__iter__(), self._cfg)


def make_dataset(source, tokenizer, *, view: str, seq_len: int, query_len: int,
                 batch_size: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, process_index: int = 0,
                 process_count: int = 1, ict_remove_rate: float = 0.9,
                 ict_unit: str = "line", num_threads: int | None = None,
                 segment_rows: int | None = None, num_negatives: int = 0,
                 ccp_window: int = 2) -> grain.IterDataset:
  """Batches of `view` examples from `source` (document texts); `iter(ds)` is checkpointable.

  `batch_size` is global; each process reads its own documents (process_index::process_count).
  """
  if view not in VIEWS:
    raise ValueError(f"Unknown view {view!r}; allowed: {', '.join(VIEWS)}.")
  if ict_unit not in ICT_UNITS:
    raise ValueError(f"Unknown ict_unit {ict_unit!r}; allowed: {', '.join(ICT_UNITS)}.")
  if seq_len < 3 or query_len < 3:
    raise ValueError(f"seq_len {seq_len} and query_len {query_len} must be >= 3 "
                     "([CLS] token [SEP]).")
  local_batch = pipeline.local_batch_size(batch_size, process_count)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(f"Process {process_index}/{process_count} got no documents from "
                     f"{source!r}; use a larger split.")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.random_map(Examples(tokenizer, view, seq_len, query_len, ict_remove_rate, ict_unit,
                              num_negatives, ccp_window), seed=seed)
  threads = num_threads if num_threads is not None else min(16, os.cpu_count() or 1)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=max(8, 4 * threads)))
  keys = features(view, num_negatives)
  return _ExampleIterDataset(
      it, view=view, keys=keys, lengths=lengths(keys, seq_len, query_len, num_negatives),
      local_batch=local_batch, seed=seed,
      shuffle=shuffle, segment_rows=segment_rows or max(16 * local_batch, 256),
      max_empty_documents=max(len(source) // process_count, 1),
      pad_last=num_epochs is not None)
