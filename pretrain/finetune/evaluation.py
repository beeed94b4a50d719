"""Fine-tuning evaluation: whole splits scored on the host.

Accuracy and F1 (binary F1 of class 1 for two classes, macro F1 otherwise) for classifiers, MRR
and recall@1 for retrieval, bug/no-bug accuracy and F1 plus localisation and joint accuracy for
the bug locator; predictions are jitted and replicated to every process.
"""
import flax.linen as nn
import jax
import numpy as np
import scipy.special

from pretrain.finetune import tasks
from pretrain.training import sharding


def classification_metrics(pred, labels, num_classes):
  """accuracy, macro_f1, and f1 (class 1's F1 when there are two classes, else macro F1)."""
  pred, labels = np.asarray(pred).ravel(), np.asarray(labels).ravel()
  f1s = []
  for k in range(num_classes):
    tp = np.sum((pred == k) & (labels == k))
    denom = np.sum(pred == k) + np.sum(labels == k)
    f1s.append(2.0 * tp / denom if denom else 0.0)
  present = [f for k, f in enumerate(f1s) if np.any(labels == k) or np.any(pred == k)]
  macro = float(np.mean(present)) if present else 0.0
  return {"accuracy": float(np.mean(pred == labels)) if len(labels) else 0.0,
          "macro_f1": macro, "f1": float(f1s[1]) if num_classes == 2 else macro}


def location_metrics(scores, labels):
  """The pointer's [N, L] position scores (padding masked) against label positions (0: no bug).

  accuracy, macro_f1 and f1 (of the buggy class) view the pointer as a bug/no-bug classifier
  (its top position > 0: buggy), comparable with the sequence head's; marginal_accuracy and
  marginal_f1 call a row buggy when the pointer puts more than half its probability on the
  function's positions, summed over them, rather than on [CLS]: unsure where a bug is, the
  pointer spreads its mass over several positions, which can leave [CLS] on top although a bug
  is the likelier answer. localization_accuracy: the share of buggy rows whose bug the top
  position hits; joint_accuracy: the share of all rows exactly right (a correct function needs
  position 0); num_buggy: how many rows localisation is scored on.
  """
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels).ravel()
  pred = scores.argmax(-1)
  no_bug = scipy.special.softmax(scores, axis=-1)[:, 0]
  buggy = labels > 0
  out = classification_metrics((pred > 0).astype(int), buggy.astype(int), 2)
  marginal = classification_metrics((no_bug < 0.5).astype(int), buggy.astype(int), 2)
  out["marginal_accuracy"], out["marginal_f1"] = marginal["accuracy"], marginal["f1"]
  hits = pred[buggy] == labels[buggy]
  out["localization_accuracy"] = float(np.mean(hits)) if len(hits) else 0.0
  out["joint_accuracy"] = float(np.mean(pred == labels)) if len(labels) else 0.0
  out["num_buggy"] = float(np.sum(buggy))
  return out


def retrieval_metrics(query_QH, cand_CH, relevant_Q):
  """MRR and recall@1 of each query's relevant candidate under dot-product scores.

  The rank counts candidates scoring strictly higher, so ties are resolved in the query's favour.
  """
  scores_QC = np.asarray(query_QH, np.float32) @ np.asarray(cand_CH, np.float32).T
  own_Q = scores_QC[np.arange(len(relevant_Q)), relevant_Q]
  rank_Q = 1 + np.sum(scores_QC > own_Q[:, None], axis=1)
  return {"mrr": float(np.mean(1.0 / rank_Q)), "recall_at_1": float(np.mean(rank_Q == 1)),
          "num_candidates": float(cand_CH.shape[0])}


class Evaluator:
  """Scores whole splits: jitted predictions (replicated to every process), metrics on the host."""

  def __init__(self, model, head, num_classes, mesh, rules, eval_batch_size):
    self.model, self.head, self.num_classes = model, head, num_classes
    self.mesh, self.rules, self.batch_size = mesh, rules, eval_batch_size
    self.batch_sharding = sharding.batch_sharding(mesh, rules)
    out = sharding.replicated(mesh)
    if head == "biencoder":
      self._fn = jax.jit(lambda p, b: model.embed(p, b, ""), out_shardings=out)
    elif head == "token":
      self._fn = jax.jit(lambda p, b: model.predict(p, b).argmax(-1), out_shardings=out)
    else:
      self._fn = jax.jit(lambda p, b: model.predict(p, b), out_shardings=out)
    self._logits_fn = jax.jit(lambda p, b: model.predict(p, b), out_shardings=out)

  def logits(self, params, split):
    """float32 logits of every row of a classification split: [N, C] or (token head) [N, L, C]."""
    return self._outputs(params, {k: v for k, v in split.items() if k != "labels"},
                         self._logits_fn)

  def _outputs(self, params, arrays, fn=None):
    fn = fn or self._fn
    n = len(next(iter(arrays.values())))
    outs = []
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for batch in tasks.eval_batches(arrays, self.batch_size, jax.process_index(),
                                      jax.process_count()):
        batch = {k: v for k, v in batch.items() if k != "weights"}
        outs.append(np.asarray(fn(params, sharding.global_batch(batch, self.batch_sharding))))
    return np.concatenate(outs)[:n]

  def from_logits(self, logits, split):
    """Classification scores of `logits(params, split)` (no second pass over the split)."""
    if self.head == "locate":
      return location_metrics(logits, split["labels"])
    labels, pred = split["labels"], np.asarray(logits).argmax(-1)
    real = labels >= 0  # Token heads: -1 is unscored.
    return classification_metrics(pred[real], labels[real], self.num_classes)

  def __call__(self, params, split):
    if self.head == "biencoder":
      queries, candidates, relevant = split
      return retrieval_metrics(self._outputs(params, queries), self._outputs(params, candidates),
                               relevant)
    rows = {k: v for k, v in split.items() if k != "labels"}
    out = self._outputs(params, rows)
    if self.head == "token":
      real = split["labels"] >= 0
      return classification_metrics(out[real], split["labels"][real], self.num_classes)
    if self.head == "locate":
      return location_metrics(out, split["labels"])
    return classification_metrics(out.argmax(-1), split["labels"], self.num_classes)
