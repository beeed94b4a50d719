"""Downstream fine-tuning of a pretrained encoder.

  python -m pretrain.finetune --config=configs/finetune/exception_type.py \
      --config.init=exports/demo --workdir=workdir/ft_exception

`--config.init` is a pretraining workdir, a `pretrain.export` directory, or a local Hugging Face
BERT / ELECTRA / RoBERTa directory (`pretrain.hf_import.load_encoder`); the tokenizer comes from
the same place. `--config.from_scratch=True` keeps that architecture and tokenizer but starts
from random weights: the baseline that shows what pretraining bought.

The run is pretraining's machinery with a task model (`pretrain.models.heads`) in place of the
objective: the same mesh and logical-axis shardings, `train.sharded_init`, the jitted
`train.train_step`, AdamW with warmup/decay (plus layer-wise learning-rate decay), Orbax
checkpoints of train state + data-iterator state, resume after a kill by rerunning the command.
Evaluation runs the whole dev split every `train.eval_every` steps and dev + test at the end;
scores are computed on the host: accuracy and F1 (binary F1 of class 1 for two classes, macro F1
otherwise), or MRR and recall@1 for retrieval. They go to metrics.jsonl and results.json.
"""
import dataclasses
import functools
import json
import os
import time

import flax.linen as nn
import jax
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from configs.finetune import common as ft_common
from pretrain import (checkpointing, hf_import, loop, metrics as metrics_lib,
                      optimizer as optimizer_lib, sharding, train)
from pretrain.data import downstream
from pretrain.models import heads

# Config keys that decide the shapes of a fine-tuning checkpoint (resume refuses others).
SHAPE_FIELDS = ("init", "task.head", "task.num_classes", "data.source", "data.label_field")
RESULTS_FILE = "results.json"


# --- Optimizer -----------------------------------------------------------------------------------

def layer_depth(path, num_layers):
  """0 for the embeddings, i + 1 for layer_i, num_layers + 1 for the head."""
  names = [str(getattr(k, "key", k)) for k in path]
  if names[0] != "encoder":
    return num_layers + 1
  if names[1].startswith("layer_"):
    return int(names[1][len("layer_"):]) + 1
  return 0


def scale_by_layer(decay, num_layers):
  """Multiplies each update by decay^(num_layers + 1 - depth): layer-wise learning-rate decay.

  After AdamW the update is -lr * (adam + wd * param), so this is exactly a per-layer lr.
  """
  def update(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
        lambda p, u: u * decay ** (num_layers + 1 - layer_depth(p, num_layers)), updates)
    return scaled, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(c, total_steps, num_layers):
  tx, schedule = optimizer_lib.make_optimizer(c, total_steps)
  if c.layer_decay < 1:
    tx = optax.chain(tx, scale_by_layer(c.layer_decay, num_layers))
  return tx, schedule


# --- Metrics -------------------------------------------------------------------------------------

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


def retrieval_metrics(query_QH, cand_CH, relevant_Q):
  """MRR and recall@1 of each query's relevant candidate under dot-product scores.

  The rank counts candidates scoring strictly higher, so ties are resolved in the query's favour.
  """
  scores_QC = np.asarray(query_QH, np.float32) @ np.asarray(cand_CH, np.float32).T
  own_Q = scores_QC[np.arange(len(relevant_Q)), relevant_Q]
  rank_Q = 1 + np.sum(scores_QC > own_Q[:, None], axis=1)
  return {"mrr": float(np.mean(1.0 / rank_Q)), "recall_at_1": float(np.mean(rank_Q == 1)),
          "num_candidates": float(cand_CH.shape[0])}


# --- Data ----------------------------------------------------------------------------------------

def encode_split(head, tok, examples, seq_len):
  if head == "token":
    return downstream.encode_tokens(tok, examples, seq_len)
  if head == "biencoder":
    return downstream.encode_pairs(tok, examples, seq_len)
  return downstream.encode_classification(tok, examples, seq_len)


def encode_eval(head, tok, split, seq_len):
  """Arrays of a dev/test split; a retrieval set becomes (query rows, candidate rows, relevant)."""
  if head == "biencoder":
    return (downstream.encode_rows(tok, split.queries, None, seq_len),
            downstream.encode_rows(tok, split.candidates, None, seq_len),
            np.asarray(split.relevant))
  return encode_split(head, tok, split, seq_len)


def num_classes_of(config, data):
  if config.task.head == "biencoder":
    return 0
  found = len(data.label_names or [])
  n = config.task.num_classes or found
  if n < found:
    raise ValueError(f"task.num_classes={n} but the training labels have {found} classes "
                     f"({data.label_names[:10]}...); raise it or set 0 (from the data).")
  return n


# --- Evaluation ----------------------------------------------------------------------------------

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

  def _outputs(self, params, arrays):
    n = len(next(iter(arrays.values())))
    outs = []
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for batch in downstream.eval_batches(arrays, self.batch_size, jax.process_index(),
                                           jax.process_count()):
        batch = {k: v for k, v in batch.items() if k != "weights"}
        outs.append(np.asarray(self._fn(params, sharding.global_batch(batch, self.batch_sharding))))
    return np.concatenate(outs)[:n]

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
    return classification_metrics(out.argmax(-1), split["labels"], self.num_classes)


# --- Loop ----------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir):
  """Fine-tunes `config.init` on the configured task in `workdir` (resuming); returns results."""
  # --- Setup ---
  ft_common.validate(config)
  preempted = loop.watch_for_preemption()
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.axis_rules)
  d, t, head = config.data, config.train, config.task.head
  batch_sharding = sharding.batch_sharding(mesh, rules)
  train._check_batch_divides(d.batch_size, batch_sharding)  # pylint: disable=protected-access
  train._check_batch_divides(d.eval_batch_size, batch_sharding)  # pylint: disable=protected-access
  pre = hf_import.load_encoder(config.init)
  model_config = dataclasses.replace(pre.config, dropout_rate=config.task.dropout_rate)
  if d.seq_len > model_config.max_len:
    raise ValueError(f"data.seq_len={d.seq_len} exceeds the {model_config.max_len} positions of "
                     f"{config.init}; lower data.seq_len.")
  tok = downstream.load_task_tokenizer(pre.tokenizer_dir)
  if tok.vocab_size > model_config.vocab_size:
    raise ValueError(f"The tokenizer in {pre.tokenizer_dir} has {tok.vocab_size} ids but the "
                     f"encoder only {model_config.vocab_size} embeddings; they do not belong "
                     "together.")
  data = downstream.load_task(d, head)
  num_classes = num_classes_of(config, data)
  train_arrays = encode_split(head, tok, data.train, d.seq_len)
  dev, test = (encode_eval(head, tok, s, d.seq_len) for s in (data.dev, data.test))
  model = heads.make(head, model_config, num_classes=num_classes, pooling=config.task.pooling,
                     use_token_types=config.task.token_types, temperature=config.task.temperature)
  tx, schedule = make_optimizer(config.optimizer, t.steps, model_config.num_layers)
  train_iter = downstream.train_iterator(train_arrays, batch_size=d.batch_size, seed=d.seed,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count())
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  init_rng, rng = jax.random.split(jax.random.key(config.seed))

  # --- State: resume > pretrained encoder (or scratch) + fresh head ---
  mngr = checkpointing.manager(workdir, t)
  target, shardings = train.abstract_state(model, tx, d.seq_len, mesh, rules)
  with jax.set_mesh(mesh):
    state = checkpointing.restore(mngr, target, train_iter, config, workdir, SHAPE_FIELDS)
  if state is None:
    state, _ = train.sharded_init(init_rng, model, tx, d.seq_len, mesh, rules)
    if not config.from_scratch:
      train._check_same_shapes(  # pylint: disable=protected-access
          pre.encoder, state.params["encoder"], config.init)
      encoder = jax.device_put(jax.tree.map(np.asarray, pre.encoder), shardings.params["encoder"])
      state = state.replace(params={**state.params, "encoder": encoder})
  else:
    logging.info("Resumed from %s at step %d.", workdir, int(state.step))
  sharding.assert_sufficiently_sharded(state.params, mesh)
  start = int(state.step)
  writer.truncate_after(start)

  # --- Compiled functions ---
  step_fn = jax.jit(functools.partial(train.train_step, objective=model, tx=tx, schedule=schedule,
                                      accum_steps=config.optimizer.grad_accum_steps,
                                      nonfinite=t.nonfinite),
                    in_shardings=(shardings, batch_sharding, None),
                    out_shardings=(shardings, None), donate_argnums=0)
  evaluate = Evaluator(model, head, num_classes, mesh, rules, d.eval_batch_size)
  kind = f"{num_classes} classes" if num_classes else "retrieval"
  scratch = ", from scratch" if config.from_scratch else ""
  print(f"Fine-tuning {config.init} ({pre.source}{scratch}) on {d.source}: {len(data.train)} "
        f"train examples, {kind}, steps {start}..{t.steps}.", flush=True)

  def run_eval(step, state, splits):
    result = {f"{name}_{k}": v for name, split in splits.items()
              for k, v in evaluate(state.params, split).items()}
    writer.write(step, result)
    metrics_lib.console_line(step, t.steps, result)
    return result

  # --- Loop (pretraining's: pretrain/loop.py); dev scores on the way, dev + test at the end ---
  evaluate_dev = lambda step, state: run_eval(step, state, {"dev": dev}) if step < t.steps else {}  # noqa: E731
  save = lambda step, state: checkpointing.save(mngr, step, state, train_iter, config)  # noqa: E731
  state, _ = loop.run(
      state, step_fn, lambda: sharding.global_batch(next(train_iter), batch_sharding), rng,
      start=start, train_config=t, tokens_per_step=d.batch_size * d.seq_len, writer=writer,
      mesh=mesh, rules=rules, preempted=preempted, save=save, evaluate=evaluate_dev)

  # --- Finish: dev and test scores of the final parameters (none when preempted) ---
  final = ({} if int(state.step) < t.steps
           else run_eval(t.steps, state, {"dev": dev, "test": test}))
  results = {"init": config.init, "source": pre.source, "from_scratch": config.from_scratch,
             "task": d.source, "head": head, "step": int(state.step),
             "num_train": len(data.train), "labels": data.label_names, **final}
  if head == "sequence":  # What always answering the most frequent training label scores.
    majority = np.bincount(train_arrays["labels"]).argmax()
    results.update({f"{name}_majority_accuracy": float(np.mean(split["labels"] == majority))
                    for name, split in (("dev", dev), ("test", test))})
  if jax.process_index() == 0 and final:
    with open(os.path.join(workdir, RESULTS_FILE), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  checkpointing.wait(mngr)
  mngr.close()
  writer.close()
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  jax.config.update("jax_threefry_partitionable", True)
  t0 = time.perf_counter()
  workdir = flags.FLAGS.workdir
  results = train_and_evaluate(flags.FLAGS.config, workdir)
  scores = {k: round(v, 4) for k, v in results.items() if k.startswith(("dev_", "test_"))}
  print(f"Done in {time.perf_counter() - t0:.0f}s: {json.dumps(scores)} "
        f"({workdir}/{RESULTS_FILE})", flush=True)


if __name__ == "__main__":
  # Defined here, not at import, so that importing this module defines no flags.
  config_flags.DEFINE_config_file("config", None, "configs/finetune/<task>.py[:key=value,...]")
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
