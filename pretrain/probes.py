"""Linear probes on frozen features and zero-shot retrieval: the cheap half of the benchmark.

A probe freezes the encoder, mean-pools its final hidden states over each row's tokens and fits a
multinomial logistic regression on the task's training rows (features standardised with the
training rows' statistics; the L2 strength picked on the dev split from L2_GRID), then scores the
held-out test rows: SentEval's protocol at the scale of the built-in code tasks. A pair task
(docstring match) encodes each side alone and probes [u, v, |u - v|, u * v] (InferSent's pair
features). It measures what the features already hold, without a fine-tuning budget: at a few
seconds per task it is what runs during pretraining (`train.probe_every`, `ProbeSuite`) and what
`python -m pretrain.benchmark --probe` reports for many models and seeds.

Zero-shot retrieval here is the benchmark's docstring -> code task scored the same way
(mean-pooled cosine, MRR@10); `max_candidates` keeps a seeded subset of the functions (and the
queries whose function is in it) so that a check during pretraining stays cheap.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pretrain import retrieval
from pretrain.finetune import bench_scores, code_tasks, task_tokenizer, tasks
from pretrain.models import encoder as enc, pooling

CLASSIFICATION = ("exception_type", "docstring_match", "variable_misuse", "swapped_operands",
                  "wrong_binary_operator")
RETRIEVAL = "docstring_retrieval"
TASKS = CLASSIFICATION + (RETRIEVAL,)
PAIR_TASKS = ("docstring_match",)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
FIT_STEPS = 300
BATCH_SIZE = 32


@dataclasses.dataclass(frozen=True)
class ProbeBudget:
  """Rows per split (0: all), tokens per row, files read (0: every stdlib file)."""
  max_train: int = 2000
  max_dev: int = 500
  max_test: int = 0
  seq_len: int = 256
  max_candidates: int = 0
  max_files: int = 0


# --- Data ---------------------------------------------------------------------------------------

def subsample(rows: list, n: int, seed: int) -> list:
  """At most `n` rows (0: all), drawn by a seeded permutation and kept in their order."""
  if not n or len(rows) <= n:
    return list(rows)
  keep = np.sort(np.random.default_rng(seed).permutation(len(rows))[:n])
  return [rows[i] for i in keep]


def task_config(task: str, *, seed: int = 0, validation_fraction: float = 0.05,
                max_files: int = 0, cache_dir: str = "data/code_tasks"):
  """The `config.data` block that `tasks.builtin_task` reads for a built-in task."""
  return ml_collections.ConfigDict(dict(
      source=task, validation_fraction=validation_fraction, dev_fraction=0.1,
      max_files=max_files, num_exception_types=code_tasks.DEFAULT_NUM_EXCEPTION_CLASSES,
      seed=seed, cache_dir=cache_dir))


@dataclasses.dataclass
class ProbeTask:
  """One classification task's rows, already subsampled to the budget."""
  name: str
  train: list
  dev: list
  test: list
  num_classes: int


def load_task(task: str, budget: ProbeBudget, *, seed: int = 0, validation_fraction: float = 0.05,
              cache_dir: str = "data/code_tasks") -> ProbeTask:
  data = tasks.builtin_task(task_config(task, seed=seed, validation_fraction=validation_fraction,
                                        max_files=budget.max_files, cache_dir=cache_dir))
  empty = [name for name in ("train", "dev", "test") if not getattr(data, name)]
  if empty:
    files = f"the first {budget.max_files}" if budget.max_files else "the"
    raise ValueError(f"The {task} probe has no {empty[0]} examples in {files} stdlib files; "
                     "read more files (train.probe_max_files, 0: all).")
  return ProbeTask(task, subsample(data.train, budget.max_train, seed),
                   subsample(data.dev, budget.max_dev, seed + 1),
                   subsample(data.test, budget.max_test, seed + 2), len(data.label_names))


def retrieval_subset(queries, candidates, relevant, max_candidates: int, seed: int = 0):
  """(queries, candidates, relevant) restricted to a seeded subset of `max_candidates`
  candidates (0: all) and the queries whose answer is among them."""
  if not max_candidates or len(candidates) <= max_candidates:
    return list(queries), list(candidates), list(relevant)
  keep = np.sort(np.random.default_rng(seed).permutation(len(candidates))[:max_candidates])
  index = {int(c): i for i, c in enumerate(keep)}
  pairs = [(q, index[r]) for q, r in zip(queries, relevant) if r in index]
  return [q for q, _ in pairs], [candidates[i] for i in keep], [r for _, r in pairs]


def as_task_tokenizer(tokenizer) -> task_tokenizer.TaskTokenizer:
  """Our sentencepiece tokenizer (or a TaskTokenizer already) as the rows' encoder."""
  if isinstance(tokenizer, task_tokenizer.TaskTokenizer):
    return tokenizer
  return task_tokenizer.from_sentencepiece(tokenizer)


# --- Features -----------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config",))
def _mean_pooled(params, ids_BL, segment_BL, positions_BL, *, config):
  hidden_BLH = enc.Encoder(config).apply({"params": params}, ids_BL, segment_BL, positions_BL)
  return pooling.mean(hidden_BLH.astype(jnp.float32), segment_BL)


def features(params, config, tok, texts, seq_len: int) -> np.ndarray:
  """float32 [N, H] mean-pooled final states of "[CLS] text [SEP]" rows; rows sorted by length
  and cut to a multiple of 16 so that few shapes compile."""
  seq_len = min(seq_len, config.max_len)
  rows = tasks.encode_rows(tok, list(texts), None, seq_len)
  lengths = rows["segment_ids"].sum(1)
  order = np.argsort(lengths, kind="stable")
  out = np.zeros((len(texts), config.hidden_size), np.float32)
  for start in range(0, len(texts), BATCH_SIZE):
    take = order[start:start + BATCH_SIZE]
    width = min(seq_len, -(-int(lengths[take].max()) // 16) * 16)
    batch = {k: np.zeros((BATCH_SIZE, width), np.int32) for k in ("input_ids", "segment_ids",
                                                                  "positions")}
    for k, v in batch.items():
      v[:len(take)] = rows[k][take, :width]
    batch["segment_ids"][len(take):, 0] = 1  # Padding rows: one token, so the mean is defined.
    pooled = _mean_pooled(params, batch["input_ids"], batch["segment_ids"], batch["positions"],
                          config=config)
    out[take] = np.asarray(pooled)[:len(take)]
  return out


def example_features(params, config, tok, rows, task: str, seq_len: int) -> np.ndarray:
  """A task's probe inputs: one text's features, or [u, v, |u - v|, u * v] of a pair."""
  u = features(params, config, tok, [r["text"] for r in rows], seq_len)
  if task not in PAIR_TASKS:
    return u
  v = features(params, config, tok, [r["text_b"] for r in rows], seq_len)
  return np.concatenate([u, v, np.abs(u - v), u * v], axis=1)


# --- The probe ----------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(x_ND, y_N, l2, *, num_classes, steps):
  """(W, b) of softmax regression, full batch, Adam: convex, so the start does not matter."""
  params = (jnp.zeros((x_ND.shape[1], num_classes)), jnp.zeros(num_classes))
  tx = optax.adam(0.05)

  def loss(p):
    logits = x_ND @ p[0] + p[1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_N).mean()
    return ce + l2 * jnp.sum(p[0] ** 2)

  def step(carry, _):
    p, opt = carry
    updates, opt = tx.update(jax.grad(loss)(p), opt)
    return (optax.apply_updates(p, updates), opt), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return params


def _accuracy(params, x, y) -> float:
  return float(np.mean(np.argmax(x @ np.asarray(params[0]) + np.asarray(params[1]), 1) == y))


def fit_and_score(x_train, y_train, x_dev, y_dev, x_test, y_test, num_classes: int) -> dict:
  """The probe picked on dev from L2_GRID, scored on test: {test_accuracy, dev_accuracy, l2}."""
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  x_train, x_dev, x_test = ((x - mean) / std for x in (x_train, x_dev, x_test))
  best = None
  for l2 in L2_GRID:
    params = _fit(jnp.asarray(x_train), jnp.asarray(y_train), l2, num_classes=num_classes,
                  steps=FIT_STEPS)
    dev = _accuracy(params, x_dev, y_dev)
    if best is None or dev > best[0]:
      best = (dev, l2, params)
  dev, l2, params = best
  return {"test_accuracy": _accuracy(params, x_test, y_test), "dev_accuracy": dev, "l2": l2}


def labels(rows) -> np.ndarray:
  return np.asarray([r["label"] for r in rows], np.int32)


def majority_accuracy(train_rows, test_rows) -> float:
  """The test accuracy of always answering the training rows' most frequent label."""
  top = np.bincount(labels(train_rows)).argmax()
  return float(np.mean(labels(test_rows) == top))


def probe(params, config, tok, task: ProbeTask, seq_len: int) -> dict:
  """The frozen-feature probe of one encoder on one task."""
  x = [example_features(params, config, tok, rows, task.name, seq_len)
       for rows in (task.train, task.dev, task.test)]
  return fit_and_score(x[0], labels(task.train), x[1], labels(task.dev), x[2], labels(task.test),
                       task.num_classes)


def reciprocal_ranks(params, config, tok, queries, candidates, relevant, seq_len: int):
  """Per-query reciprocal ranks (within the first 10) of mean-pooled cosine retrieval."""
  q = features(params, config, tok, queries, seq_len)
  c = features(params, config, tok, candidates, seq_len)
  return bench_scores.reciprocal_ranks(retrieval.ranks(retrieval.cosine_scores(q, c), relevant))


# --- During pretraining --------------------------------------------------------------------------

class ProbeSuite:
  """The probes of `task_names` on fixed data, for an encoder's parameters at any step.

  `suite(encoder_params)` -> {"probe_<task>_accuracy" | "probe_docstring_retrieval_mrr": value}.
  The data are built once (from the JSON cache of `tasks.builtin_task` when it exists).
  """

  def __init__(self, task_names, config, tokenizer, budget: ProbeBudget, *, seed: int = 0,
               validation_fraction: float = 0.05, cache_dir: str = "data/code_tasks"):
    self.config, self.budget = config, budget
    self.tok = as_task_tokenizer(tokenizer)
    self.tasks = [load_task(t, budget, seed=seed, validation_fraction=validation_fraction,
                            cache_dir=cache_dir) for t in task_names if t in CLASSIFICATION]
    self.retrieval = None
    if RETRIEVAL in task_names:
      self.retrieval = retrieval_subset(
          *code_tasks.docstring_retrieval(validation_fraction, max_files=budget.max_files or None),
          budget.max_candidates, seed)

  def __call__(self, encoder_params) -> dict:
    params = jax.tree.map(jnp.asarray, nn.unbox(encoder_params))
    out = {}
    for task in self.tasks:
      out[f"probe_{task.name}_accuracy"] = probe(params, self.config, self.tok, task,
                                                 self.budget.seq_len)["test_accuracy"]
    if self.retrieval is not None:
      rr = reciprocal_ranks(params, self.config, self.tok, *self.retrieval, self.budget.seq_len)
      out[f"probe_{RETRIEVAL}_mrr"] = float(np.mean(rr))
    return out
