"""The benchmark's rows: a score of the model, of its random-init control, of a reference, each
with a standard error from the test-set size; printed as one markdown table and written as JSON.

Standard errors: sqrt(p (1 - p) / n) for an accuracy p over n test examples (a binomial
proportion); for a mean reciprocal rank, the standard error of the mean of the n per-query
reciprocal ranks, std(rr, ddof=1) / sqrt(n). The gain's standard error treats the two runs as
independent, sqrt(se_model^2 + se_control^2) (both are scored on the same test set, so this
overstates it when their errors are correlated).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np


def accuracy_se(p: float, n: int) -> float:
  """The standard error of an accuracy `p` measured on `n` examples."""
  return math.sqrt(p * (1.0 - p) / n) if n > 0 else float("nan")


def mean_se(values) -> float:
  """The standard error of the mean of `values` (e.g. per-query reciprocal ranks)."""
  v = np.asarray(values, np.float64)
  return float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def reciprocal_ranks(ranks, k: int = 10) -> np.ndarray:
  """1 / rank for ranks within the first k, else 0: the terms of MRR@k."""
  r = np.asarray(ranks, np.float64)
  return np.where(r <= k, 1.0 / r, 0.0)


@dataclasses.dataclass
class Row:
  """One task's line of the table. `control` is the same architecture from random weights,
  `reference` a baseline without a model (`reference_name`: majority class, BM25, ...)."""
  task: str
  metric: str
  n: int
  model: float | None
  control: float | None = None
  reference: float | None = None
  reference_name: str = ""
  model_se: float | None = None
  control_se: float | None = None
  reference_se: float | None = None
  note: str = ""

  @property
  def gain(self) -> float | None:
    if self.model is None or self.control is None:
      return None
    return self.model - self.control

  @property
  def gain_se(self) -> float | None:
    if self.model_se is None or self.control_se is None:
      return None
    return math.sqrt(self.model_se ** 2 + self.control_se ** 2)

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "gain": self.gain, "gain_se": self.gain_se}


def accuracy_row(task, n, model, control=None, reference=None, reference_name="", note=""):
  """A row of accuracies over `n` test examples, their standard errors from `n`."""
  se = lambda p: None if p is None else accuracy_se(p, n)  # noqa: E731
  return Row(task, "accuracy", n, model, control, reference, reference_name, se(model),
             se(control), se(reference), note)


def mrr_row(task, rr_model, rr_control, rr_reference, reference_name="BM25", note=""):
  """A row of MRR@10 from per-query reciprocal ranks (arrays of one value per query)."""
  mean = lambda rr: float(np.mean(rr))  # noqa: E731
  return Row(task, "MRR@10", len(rr_model), mean(rr_model), mean(rr_control),
             mean(rr_reference), reference_name, mean_se(rr_model), mean_se(rr_control),
             mean_se(rr_reference), note)


def skipped_row(task, metric, note) -> Row:
  return Row(task, metric, 0, None, note=note)


def _cell(value, signed=False) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  return f"{value:+.3f}" if signed else f"{value:.3f}"


HEADER = ("task", "metric", "n", "model", "control (random init)", "gain", "reference",
          "s.e. (model)")


def table(rows) -> str:
  """The markdown table of `rows`; notes (skipped tasks, caveats) follow it."""
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  for r in rows:
    ref = _cell(r.reference)
    if r.reference is not None and r.reference_name:
      ref += f" ({r.reference_name})"
    cells = [r.task, r.metric, str(r.n) if r.n else "-", _cell(r.model), _cell(r.control),
             _cell(r.gain, signed=True), ref, _cell(r.model_se)]
    lines.append("| " + " | ".join(cells) + " |")
  notes = [f"- {r.task}: {r.note}" for r in rows if r.note]
  return "\n".join(lines + ([""] + notes if notes else []))


def to_json(rows, **about) -> str:
  """The rows (with gains and standard errors) and `about` (model, budget, seed) as JSON."""
  def clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v
  return json.dumps({**about, "rows": [{k: clean(v) for k, v in r.as_dict().items()}
                                       for r in rows]}, indent=2)
