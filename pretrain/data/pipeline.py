"""grain input pipeline: documents -> [CLS] chunk [SEP] -> packed rows -> batches.

Stages:
  1. this process's shard of the source: records process_index::process_count;
  2. deterministic shuffle by seed, a different permutation each epoch;
  3. tokenize in grain's multithreaded map (the tokenizer releases the GIL);
  4. pack (`_PackIterator`): a document longer than seq_len becomes several
     "[CLS] ... [SEP]" chunks of at most seq_len -- never dropped or cut short;
     full-length chunks are rows by themselves, the last (shorter) chunk of each
     document is placed first-fit into one of `num_packing_bins` open rows;
  5. batch to batch_size // process_count rows.
Each batch is {"input_ids", "segment_ids", "positions"}: int32 [local_batch,
seq_len]; padding is input_ids 0 ([PAD]), segment_ids 0, positions 0; segments
are numbered 1, 2, ... within a row and positions restart at 0 in each segment,
so attention is masked to equal, non-zero segment_ids.

Why a custom packer: grain's generic FirstFitPackIterDataset costs ~0.25 ms of
Python per row, which capped the pipeline at ~330k tokens/s here; this one packs
a whole "segment" of documents with numpy. A segment ends when a document's last
chunk fits no open bin (or too many rows are buffered); the packer is empty at
segment boundaries, so the checkpoint is just (parent state at the segment's
first document, segment number, rows already taken) and restoring replays one
segment. For training, rows are shuffled within their segment.

Repeating data (num_epochs=None) never ends, so it has no partial batch. Finite
data (e.g. evaluation: shuffle=False, num_epochs=1) pads its last partial batch
with all-padding rows, so every document is seen exactly once per epoch.
"""

from __future__ import annotations

import os

import grain
import numpy as np

from pretrain.data import tokenizer as tokenizer_lib

KEYS = ("input_ids", "segment_ids", "positions")


class _Tokenize:
  """Document text -> int32 token ids (a picklable grain map callable)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(text), dtype=np.int32)


def chunk_document(ids, seq_len: int, cls_id: int = tokenizer_lib.CLS_ID,
                   sep_id: int = tokenizer_lib.SEP_ID) -> list[np.ndarray]:
  """Splits token ids into "[CLS] ... [SEP]" chunks of at most seq_len tokens."""
  body = seq_len - 2
  return [np.asarray([cls_id, *ids[i:i + body], sep_id], dtype=np.int32)
          for i in range(0, len(ids), body)]


def _pack_rows(bins: list[list[np.ndarray]], seq_len: int):
  """Rows (input_ids, segment_ids, positions) from bins of chunks."""
  out = np.zeros((3, len(bins), seq_len), np.int32)
  for r, chunks in enumerate(bins):
    start = 0
    for seg, chunk in enumerate(chunks, start=1):
      end = start + len(chunk)
      out[0, r, start:end] = chunk
      out[1, r, start:end] = seg
      out[2, r, start:end] = np.arange(len(chunk))
      start = end
  return out


class _PackIterator(grain.DatasetIterator):
  """Packs token-id documents into rows and batches; see module docstring."""

  def __init__(self, parent, cfg: dict):
    super().__init__(parent)
    self._cfg = cfg
    self._mark = parent.get_state()  # Parent state at the segment's start.
    self._segment = 0  # Number of the segment in `_rows`.
    self._rows = np.zeros((3, 0, cfg["seq_len"]), np.int32)
    self._taken = 0  # Rows of `_rows` already returned.
    self._pending = None  # (parent state, ids) read but not yet packed.
    self._built = False  # Whether `_rows` holds segment `_segment`.
    self._exhausted = False

  def _read(self):
    if self._pending is None and not self._exhausted:
      state = self._parent.get_state()
      try:
        self._pending = (state, next(self._parent))
      except StopIteration:
        self._exhausted = True
    return self._pending

  def _build_segment(self) -> None:
    """Packs documents into `_rows` until the next segment boundary."""
    seq_len, body = self._cfg["seq_len"], self._cfg["seq_len"] - 2
    full, bins, free = [], [], []
    first = self._read()
    self._mark = first[0] if first else self._parent.get_state()
    while (doc := self._read()) is not None:
      ids = doc[1]
      n_full = len(ids) // body
      rest = len(ids) - n_full * body
      fit = next((b for b, f in enumerate(free) if f >= rest + 2), None) if rest else -1
      n_rows = sum(len(f) for f in full) + len(bins)
      if (full or bins) and ((fit is None and len(bins) == self._cfg["bins"])
                             or n_rows >= self._cfg["max_segment_rows"]):
        break  # Segment boundary: this document starts the next one.
      self._pending = None
      if n_full:
        rows = np.empty((n_full, seq_len), np.int32)
        rows[:, 0], rows[:, -1] = self._cfg["cls_id"], self._cfg["sep_id"]
        rows[:, 1:-1] = ids[:n_full * body].reshape(n_full, body)
        full.append(rows)
      if rest:
        chunk = np.concatenate([[self._cfg["cls_id"]], ids[n_full * body:],
                                [self._cfg["sep_id"]]]).astype(np.int32)
        if fit is None:  # Open a new bin.
          fit = len(bins)
          bins.append([])
          free.append(seq_len)
        bins[fit].append(chunk)
        free[fit] -= len(chunk)
    packed = [_pack_rows(bins, seq_len)]
    if full:
      ids = np.concatenate(full)
      packed.insert(0, np.stack([ids, np.ones_like(ids),
                                 np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                                 ids.shape)]))
    rows = np.concatenate(packed, axis=1)
    if self._cfg["shuffle"]:
      perm = np.random.default_rng([self._cfg["seed"], self._segment]).permutation(
          rows.shape[1])
      rows = rows[:, perm]
    self._rows, self._taken, self._built = rows, 0, True

  def _take(self, n: int) -> np.ndarray:
    parts, need = [], n
    while need:
      if not self._built:
        self._build_segment()
      if self._taken == self._rows.shape[1]:
        if self._exhausted and self._pending is None:
          break
        self._segment, self._built = self._segment + 1, False
        continue
      part = self._rows[:, self._taken:self._taken + need]
      self._taken += part.shape[1]
      need -= part.shape[1]
      parts.append(part)
    return np.concatenate(parts, axis=1) if parts else self._rows[:, :0]

  def __next__(self) -> dict:
    batch = self._cfg["local_batch"]
    rows = self._take(batch)
    got = rows.shape[1]
    if got == 0 or (got < batch and not self._cfg["pad_last"]):
      raise StopIteration
    if got < batch:
      rows = np.concatenate(
          [rows, np.zeros((3, batch - got, rows.shape[2]), np.int32)], axis=1)
    return {k: np.ascontiguousarray(rows[i]) for i, k in enumerate(KEYS)}

  def get_state(self) -> dict:
    return {"mark": self._mark, "segment": self._segment, "taken": self._taken}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["mark"])
    self._pending, self._exhausted = None, False
    self._segment = state["segment"]
    self._build_segment()  # Replays one segment of documents.
    self._taken = state["taken"]


class _PackIterDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, **cfg):
    super().__init__(parent)
    self._cfg = cfg

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._cfg)


def local_batch_size(batch_size: int, process_count: int) -> int:
  """The per-process batch; the global batch must split evenly."""
  if batch_size <= 0 or process_count <= 0 or batch_size % process_count:
    raise ValueError(
        f"batch_size {batch_size} is not divisible by process_count "
        f"{process_count}; choose a global batch_size that is a multiple "
        f"of {process_count}.")
  return batch_size // process_count


def make_dataset(source, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1,
                 num_threads: int | None = None,
                 num_packing_bins: int | None = None) -> grain.IterDataset:
  """Builds the pipeline; `iter(ds)` gives a checkpointable DatasetIterator.

  `source` is a random-access source of document texts (see
  `pretrain.data.sources.open_source`); `batch_size` is global. Restoring
  `it.set_state(state)` on a fresh iterator of an identically built dataset
  continues with exactly the same batches; the state is plain JSON.
  """
  local_batch = local_batch_size(batch_size, process_count)
  if seq_len < 3:
    raise ValueError(f"seq_len {seq_len} leaves no room for a token between "
                     "[CLS] and [SEP]; use seq_len >= 3 (typically 128-512).")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None (repeat forever) or >= 1, "
                     f"got {num_epochs}.")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise ValueError(
        f"Process {process_index}/{process_count} got no documents from "
        f"{source!r}; the split is empty or smaller than process_count -- "
        "use a larger split.")
  if shuffle:
    ds = ds.shuffle(seed=seed)  # `repeat` reseeds it every epoch.
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map(_Tokenize(tokenizer))
  threads = num_threads if num_threads is not None else min(16, os.cpu_count() or 1)
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(8, 4 * threads)))
  bins = num_packing_bins or max(2 * local_batch, 64)
  return _PackIterDataset(
      it, seq_len=seq_len, local_batch=local_batch, bins=bins, seed=seed,
      shuffle=shuffle, max_segment_rows=max(8 * bins, 4 * local_batch),
      pad_last=num_epochs is not None,
      # A third-party vocabulary (e.g. BERT's [CLS]=101) brings its own ids.
      cls_id=getattr(tokenizer, "cls_id", tokenizer_lib.CLS_ID),
      sep_id=getattr(tokenizer, "sep_id", tokenizer_lib.SEP_ID))
