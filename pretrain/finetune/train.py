"""Fine-tuning: `train_and_evaluate(config, workdir)` of a task model over a pretrained encoder.

`config.init` is a pretraining workdir, a `pretrain.export` directory, a local Hugging Face
BERT / ELECTRA / RoBERTa directory (`pretrain.interop.load.load_encoder`) or another fine-tuning
workdir (its encoder: `pretrain.finetune.task_workdir`); the tokenizer comes from the same place.
`config.from_scratch=True` keeps that architecture and tokenizer but starts from random weights:
the baseline that shows what pretraining bought.

The run is pretraining's machinery (`pretrain.training.run`) with a task model
(`pretrain.finetune.heads`) in place of the objective: the same mesh and logical-axis shardings,
sharded init, jitted train step, AdamW with warmup/decay (plus layer-wise learning-rate decay),
Orbax checkpoints of train state + data-iterator state, resume after a kill by rerunning the
command. `config.teacher` (a finished fine-tuning workdir of the same task) trains on its soft
predictions instead (`pretrain.finetune.distill`; the teacher runs frozen inside the step) and
adds student-teacher agreement and KL to the dev/test scores. Evaluation runs the whole dev split
every `train.eval_every` steps and dev + test at the end (`pretrain.finetune.evaluation`); scores
go to metrics.jsonl and results.json.
"""
import dataclasses
import json
import os

import jax
import numpy as np
import optax

from configs.finetune import common as ft_common
from pretrain.finetune import (distill, evaluation, heads, task_tokenizer, task_workdir, tasks,
                               teacher as teacher_lib)
from pretrain.training import (metrics as metrics_lib, optimizer as optimizer_lib,
                               run as run_lib, state as state_lib)

# Config keys that decide the shapes of a fine-tuning checkpoint (resume refuses others).
# task.labels fixes what each class index means; the teacher is part of the checkpointed state.
SHAPE_FIELDS = ("init", "task.head", "task.num_classes", "task.labels", "data.source",
                "data.label_field", "teacher")
RESULTS_FILE = task_workdir.RESULTS_FILE


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


# --- Data ----------------------------------------------------------------------------------------

def encode_split(head, tok, examples, seq_len):
  if head == "token":
    return tasks.encode_tokens(tok, examples, seq_len)
  if head == "biencoder":
    return tasks.encode_pairs(tok, examples, seq_len)
  if head == "locate":
    return tasks.encode_locations(tok, examples, seq_len)
  return tasks.encode_classification(tok, examples, seq_len)


def encode_eval(head, tok, split, seq_len):
  """Arrays of a dev/test split; a retrieval set becomes (query rows, candidate rows, relevant)."""
  if head == "biencoder":
    return (tasks.encode_rows(tok, split.queries, None, seq_len),
            tasks.encode_rows(tok, split.candidates, None, seq_len),
            np.asarray(split.relevant))
  return encode_split(head, tok, split, seq_len)


def classes_of(head, labels):
  """The class of each row's label: the label itself, or for the locator bug (a position > 0) or
  no bug."""
  return (labels > 0).astype(np.int32) if head == "locate" else labels


def location_baselines(splits, examples):
  """Per split (name -> arrays): how many function pairs `encode_locations` dropped (site past
  data.seq_len), and the localisation accuracy of pointing at a uniformly drawn token of the
  function ([CLS] and [SEP] excluded) in each buggy row."""
  out = {}
  for name, arrays in splits.items():
    buggy = arrays["labels"] > 0
    tokens = arrays["segment_ids"][buggy].sum(1) - 2
    out[f"{name}_dropped_pairs"] = (len(examples[name]) - len(arrays["labels"])) // 2
    out[f"{name}_localization_chance"] = float(np.mean(1.0 / tokens)) if buggy.any() else 0.0
  return out


def num_classes_of(config, data):
  if config.task.head == "biencoder":
    return 0
  found = len(data.label_names or [])
  n = config.task.num_classes or found
  if n < found:
    raise ValueError(f"task.num_classes={n} but the training labels have {found} classes "
                     f"({data.label_names[:10]}...); raise it or set 0 (from the data).")
  return n


# --- Loop ----------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir):
  """Fine-tunes `config.init` on the configured task in `workdir` (resuming); returns results."""
  # --- Setup ---
  ft_common.validate(config)
  d, t, head = config.data, config.train, config.task.head
  # Every row, label and split size is checked before anything is loaded or compiled.
  data = tasks.load_task(d, head, labels=ft_common.label_list(config.task.labels),
                         train_steps=t.steps)
  num_classes = num_classes_of(config, data)
  run = run_lib.start(config, workdir, {"data.batch_size": d.batch_size,
                                        "data.eval_batch_size": d.eval_batch_size})
  pre = task_workdir.load_encoder(config.init, what="config.init")
  model_config = dataclasses.replace(pre.config, dropout_rate=config.task.dropout_rate)
  if d.seq_len > model_config.max_len:
    raise ValueError(f"data.seq_len={d.seq_len} exceeds the {model_config.max_len} positions of "
                     f"{config.init}; lower data.seq_len.")
  tok = task_tokenizer.load_task_tokenizer(pre.tokenizer_dir)
  if tok.vocab_size > model_config.vocab_size:
    raise ValueError(f"The tokenizer in {pre.tokenizer_dir} has {tok.vocab_size} ids but the "
                     f"encoder only {model_config.vocab_size} embeddings; they do not belong "
                     "together.")
  train_arrays = encode_split(head, tok, data.train, d.seq_len)
  dev, test = (encode_eval(head, tok, s, d.seq_len) for s in (data.dev, data.test))
  model = heads.make(head, model_config, num_classes=num_classes, pooling=config.task.pooling,
                     use_token_types=config.task.token_types, temperature=config.task.temperature)
  teacher = (teacher_lib.load_teacher(config, data.label_names, num_classes, pre.tokenizer_dir)
             if config.teacher else None)
  if teacher is not None:
    model = distill.Distilled(model, teacher.model, d.seq_len,
                              temperature=config.distill_temperature, alpha=config.distill_alpha)
  tx, schedule = make_optimizer(config.optimizer, t.steps, model_config.num_layers)
  train_iter = tasks.train_iterator(train_arrays, batch_size=d.batch_size, seed=d.seed,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  init_rng, rng = jax.random.split(jax.random.key(config.seed))
  run_lib.open_workdir(run, model, tx, d.seq_len)

  # --- State: resume > pretrained encoder (or scratch) + fresh head (+ the teacher) ---
  fresh = []

  def init_params(params, param_shardings):
    fresh.append(True)
    if config.from_scratch:
      return params
    state_lib.check_same_shapes(pre.encoder, params["encoder"], config.init)
    encoder = jax.device_put(jax.tree.map(np.asarray, pre.encoder), param_shardings["encoder"])
    return {**params, "encoder": encoder}

  state, shardings = run_lib.restore_or_init(run, model, tx, d.seq_len, init_rng, train_iter,
                                             SHAPE_FIELDS, init_params)
  if teacher is not None and fresh:
    state = distill.with_teacher(state, teacher.params, shardings)
  start = int(state.step)
  run.writer.truncate_after(start)

  # --- Compiled functions ---
  step_fn = run_lib.compile_step(run, model, tx, schedule, shardings)
  evaluate = evaluation.Evaluator(model, head, num_classes, run.mesh, run.rules, d.eval_batch_size)
  kind = f"{num_classes} classes" if num_classes else "retrieval"
  if head == "locate":
    located = location_baselines({"train": train_arrays, "dev": dev, "test": test},
                                 {"train": data.train, "dev": data.dev, "test": data.test})
    kind = ("bug localisation, function pairs dropped for a site past data.seq_len: "
            + ", ".join(f"{n} {located[n + '_dropped_pairs']}" for n in ("train", "dev", "test")))
  scratch = ", from scratch" if config.from_scratch else ""
  if teacher is not None:
    scratch += (f", distilled from {config.teacher} (T={config.distill_temperature}, "
                f"alpha={config.distill_alpha})")
  print(f"Fine-tuning {config.init} ({pre.source}{scratch}) on {d.source}: {len(data.train)} "
        f"train examples, {kind}, steps {start}..{t.steps}.", flush=True)

  soft = {} if teacher is None else {  # The teacher's logits of dev and test, computed once.
      name: evaluation.Evaluator(teacher.model, head, num_classes, run.mesh, run.rules,
                                 d.eval_batch_size).logits(teacher.params, split)
      for name, split in (("dev", dev), ("test", test))}

  def scores(params, name, split):
    if teacher is None:
      return evaluate(params, split)
    logits = evaluate.logits(params, split)
    return {**evaluate.from_logits(logits, split),
            **distill.agreement_metrics(logits, soft[name], split["labels"],
                                        config.distill_temperature)}

  def run_eval(step, state, splits):
    result = {f"{name}_{k}": v for name, split in splits.items()
              for k, v in scores(state.params, name, split).items()}
    run.writer.write(step, result)
    metrics_lib.console_line(step, t.steps, result)
    return result

  # --- Loop (pretraining's); dev scores on the way, dev + test at the end ---
  def evaluate_dev(step, state):
    return run_eval(step, state, {"dev": dev}) if step < t.steps else {}

  state, _ = run_lib.train(run, state, step_fn, train_iter, rng, start_step=start,
                           tokens_per_step=d.batch_size * metrics_lib.tokens_per_example(
                               model.example_batch(d.seq_len)), evaluate=evaluate_dev)

  # --- Finish: dev and test scores of the final parameters (none when preempted) ---
  final = ({} if int(state.step) < t.steps
           else run_eval(t.steps, state, {"dev": dev, "test": test}))
  results = {"init": config.init, "source": pre.source, "from_scratch": config.from_scratch,
             "task": d.source, "head": head, "step": int(state.step),
             "num_train": len(data.train), "labels": data.label_names, **final}
  if teacher is not None:
    results.update(teacher=config.teacher, distill_temperature=config.distill_temperature,
                   distill_alpha=config.distill_alpha,
                   **{f"teacher_{k}": v for k, v in teacher.results.items()
                      if k.startswith(("dev_", "test_")) and "teacher" not in k})
  if head in ("sequence", "locate"):  # What always answering the most frequent label scores.
    majority = np.bincount(classes_of(head, train_arrays["labels"])).argmax()
    results.update({f"{name}_majority_accuracy":
                    float(np.mean(classes_of(head, split["labels"]) == majority))
                    for name, split in (("dev", dev), ("test", test))})
  if head == "locate":
    results.update(located)
  if jax.process_index() == 0 and final:
    with open(os.path.join(workdir, RESULTS_FILE), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  run_lib.finish(run)
  return results
