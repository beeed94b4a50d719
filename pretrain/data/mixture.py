"""Mixtures of pair sources: several pair files with weights, one checkpointable iterator.

`data.mixture="code=pairs/code*.jsonl:0.7,docs=pairs/docs.jsonl:0.3"` (with data.name=pair_files,
in place of data.paths) names each source, its files and its weight (weights are normalised).
`data.mixture_mode`:
  batch  every batch comes from one source, drawn with the weights: in-batch negatives are then
         of the same kind as the positive, never trivially told apart by their source (as
         sentence-transformers' round-robin / proportional batch samplers do);
  row    every row's source is drawn, so a batch mixes them in proportion.
The draws are a function of (data.seed, batch number) and the weights only, and every source
keeps its own iterator, so the checkpoint holds each source's state and the batch number: a resume
continues every source exactly, and may change the weights (the next draws use the new ones; a
source added or removed is an error naming the sources).
"""
from __future__ import annotations

import grain
import numpy as np

MODES = ("batch", "row")


def parse(value: str) -> list[tuple[str, str, float]]:
  """"name=glob:weight,..." -> [(name, glob, weight)], weights normalised to sum 1."""
  out = []
  for item in [i.strip() for i in (value or "").split(",") if i.strip()]:
    name, eq, rest = item.partition("=")
    paths, colon, weight = rest.rpartition(":")
    try:
      w = float(weight)
    except ValueError:
      w = -1.0
    if not eq or not colon or not name.strip() or not paths or w <= 0:
      raise ValueError(f"data.mixture item {item!r}: write name=glob:weight with a positive "
                       "weight, e.g. code=pairs/code*.jsonl:0.7.")
    out.append((name.strip(), paths, w))
  names = [n for n, _, _ in out]
  if len(set(names)) != len(names):
    raise ValueError(f"data.mixture={value!r} names a source twice; give each source one name.")
  total = sum(w for *_, w in out)
  return [(n, p, w / total) for n, p, w in out]


class _MixtureIterator(grain.DatasetIterator):
  def __init__(self, children: dict, weights: np.ndarray, mode: str, seed: int, local_batch: int):
    super().__init__(list(children.values()))
    self._children, self._names = children, list(children)
    self._weights, self._mode, self._seed = weights, mode, seed
    self._local_batch, self._n = local_batch, 0

  def __next__(self) -> dict:
    rng = np.random.default_rng([self._seed, self._n])
    self._n += 1
    if self._mode == "batch":
      return next(self._children[self._names[rng.choice(len(self._names), p=self._weights)]])
    counts = rng.multinomial(self._local_batch, self._weights)
    parts = [self._children[name].take_rows(int(k)) for name, k in zip(self._names, counts) if k]
    rows = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    order = rng.permutation(self._local_batch)
    return {key: np.ascontiguousarray(v[order]) for key, v in rows.items()}

  def get_state(self) -> dict:
    return {"batch": self._n, "sources": {n: c.get_state() for n, c in self._children.items()}}

  def set_state(self, state: dict) -> None:
    saved = sorted(state["sources"])
    if saved != sorted(self._names):
      raise ValueError(f"The checkpoint's mixture has the sources {saved}, data.mixture has "
                       f"{sorted(self._names)}; a resume may change the weights, not the sources.")
    for name, child in self._children.items():
      child.set_state(state["sources"][name])
    self._n = int(state["batch"])


class MixtureIterDataset(grain.IterDataset):
  """Batches drawn from several per-source datasets (pairs.make_dataset) by weight."""

  def __init__(self, children: dict, weights, mode: str, seed: int, local_batch: int):
    super().__init__(list(children.values()))
    if mode not in MODES:
      raise ValueError(f"data.mixture_mode={mode!r}; choose from {', '.join(MODES)}.")
    self._children, self._weights = children, np.asarray(weights, np.float64)
    self._mode, self._seed, self._local_batch = mode, seed, local_batch

  def __iter__(self) -> _MixtureIterator:
    return _MixtureIterator({n: iter(ds) for n, ds in self._children.items()}, self._weights,
                            self._mode, self._seed, self._local_batch)
