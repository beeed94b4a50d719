"""The fine-tuning config: every key `python -m pretrain.finetune` reads, and its validation.

Recipes (configs/finetune/<task>.py) build on `base_config()` and set the task, the data and the
optimisation; the mesh, axis rules and optimizer block are pretraining's own (configs/common.py),
so the same sharding machinery and AdamW recipe apply.
"""
import ml_collections

from configs import common

SOURCES = ("exception_type", "docstring_match", "docstring_retrieval", "variable_misuse",
           "swapped_operands", "wrong_binary_operator", "files", "tfds")
HEADS = ("sequence", "token", "biencoder", "locate")
POOLINGS = ("cls", "mean", "max")
DISTILL_HEADS = ("sequence", "token")  # heads whose predictions are distributions to distil


def base_config():
  """Every key fine-tuning reads, with defaults; recipes override values, never add keys."""
  pre = common.base_config()
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init = ""                # a pretraining workdir, a pretrain.export dir or a Hugging Face
                             # BERT / ELECTRA / RoBERTa dir (its tokenizer comes along)
  c.from_scratch = False     # random weights of init's architecture and tokenizer: the baseline
  c.teacher = ""             # a finished pretrain.finetune workdir of this task: train on its soft
                             # predictions (task distillation, pretrain.finetune.distill)
  c.distill_temperature = 1.0  # T of KL(teacher_T || student_T), scaled by T^2
  c.distill_alpha = 0.0      # weight of the hard-label loss (0: pure distillation)
  c.task = ml_collections.ConfigDict(dict(
      head="sequence",       # sequence (single text or pair) | token | biencoder | locate (the
                             # bug tasks: point at the bug's first token, [CLS] for none)
      pooling="cls",         # cls | mean | max (sequence and biencoder heads)
      num_classes=0,         # 0: as many as the training labels
      labels="",             # class names in index order, comma-separated ("neg,pos"); every
                             # row's label must be one. "": the training split's labels
      token_types=True,      # second text of a pair gets token type 1 (BERT's segment B)
      temperature=0.05,      # biencoder: softmax over cosine / temperature
      dropout_rate=0.1,      # replaces the pretraining dropout in the encoder and the head
  ))
  c.data = ml_collections.ConfigDict(dict(
      source="files",        # exception_type | docstring_match | docstring_retrieval | files | tfds
                             # | variable_misuse | swapped_operands | wrong_binary_operator
      name="",               # tfds: catalog name, e.g. glue/sst2
      data_dir="data/tfds",  # tfds: where the prepared dataset is
      train="", dev="", test="",  # files: comma-separated .jsonl/.csv globs; tfds: split names
      text_field="text", text_b_field="", label_field="label",
      tokens_field="tokens", tags_field="tags",   # token head: words and one tag per word
      query_field="query", doc_field="doc",       # biencoder head
      seq_len=256,
      batch_size=32,         # global, over all processes
      eval_batch_size=64,
      validation_fraction=0.05,  # built-in tasks: the pretraining corpus split; held-out = test
      dev_fraction=0.1,      # share of the training files (built-in) or rows (no data.dev) for dev
      max_files=0,           # built-in tasks: only the first N stdlib files (tests)
      num_exception_types=20,
      cache_dir="data/code_tasks",  # built-in tasks' parsed examples ("" = no cache)
      seed=0,
  ))
  c.optimizer = pre.optimizer
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 50
  c.optimizer.layer_decay = 1.0  # lr of layer i (of n) x decay^(n - i); embeddings decay^(n+1)
  c.train = pre.train  # Pretraining's keys (steps, log/eval/checkpoint cadence, nonfinite guard).
  c.train.keep_checkpoints = 2
  del c.train["eval_batches"]  # Fine-tuning evaluates whole dev/test splits.
  c.mesh = pre.mesh
  c.axis_rules = pre.axis_rules
  return c


def set_schedule(c, steps, lr, layer_decay=None, evals=4):
  """Steps, learning rate with 10% warmup, and `evals` evaluations/checkpoints over the run."""
  c.optimizer.learning_rate = lr
  c.optimizer.warmup_steps = steps // 10
  if layer_decay is not None:
    c.optimizer.layer_decay = layer_decay
  c.train.steps = steps
  c.train.eval_every = max(1, steps // evals)
  c.train.checkpoint_every = max(1, steps // evals)
  return c


def label_list(value: str) -> tuple:
  """task.labels as a tuple of names ("" -> (): inferred from the training split)."""
  return tuple(name.strip() for name in value.split(",")) if value.strip() else ()


def validate(config):
  """Checks every value a locked ConfigDict cannot; raises naming the key and the allowed values."""
  require = common.require
  t, d, o, tr = config.task, config.data, config.optimizer, config.train
  require(bool(config.init), "init", config.init,
          "a pretraining workdir, a pretrain.export dir or a Hugging Face model dir")
  require(t.head in HEADS, "task.head", t.head, ", ".join(HEADS))
  require(t.pooling in POOLINGS, "task.pooling", t.pooling, ", ".join(POOLINGS))
  require(t.num_classes >= 0, "task.num_classes", t.num_classes, ">= 0 (0: from the data)")
  labels = label_list(t.labels)
  require(all(labels) and len(set(labels)) == len(labels) and len(labels) != 1, "task.labels",
          t.labels, "'' (from the training split) or 2+ distinct comma-separated names")
  require(not labels or (t.head != "biencoder" and d.source in ("files", "tfds")), "task.labels",
          t.labels, "'' here (declared labels are for a sequence or token head on data.source "
          "files or tfds)")
  require(not (labels and t.num_classes) or t.num_classes >= len(labels), "task.num_classes",
          t.num_classes, f"0 or >= the {len(labels)} names of task.labels")
  require(t.temperature > 0, "task.temperature", t.temperature, "> 0")
  require(not config.teacher or t.head in DISTILL_HEADS, "teacher", config.teacher,
          f"'' with task.head={t.head} (distillation is for heads {', '.join(DISTILL_HEADS)})")
  require(config.distill_temperature > 0, "distill_temperature", config.distill_temperature, "> 0")
  require(0 <= config.distill_alpha <= 1, "distill_alpha", config.distill_alpha,
          "0 <= alpha <= 1 (0: pure distillation, 1: labels only)")
  require(0 <= t.dropout_rate < 1, "task.dropout_rate", t.dropout_rate, "0 <= rate < 1")
  require(d.source in SOURCES, "data.source", d.source, ", ".join(SOURCES))
  require(d.source != "files" or bool(d.train), "data.train", d.train,
          ".jsonl/.csv globs when data.source='files'")
  require(d.source != "tfds" or bool(d.name), "data.name", d.name,
          "a TFDS catalog name such as glue/sst2 when data.source='tfds'")
  require(d.seq_len >= 8, "data.seq_len", d.seq_len, ">= 8")
  for key in ("batch_size", "eval_batch_size", "num_exception_types"):
    require(d[key] > 0, f"data.{key}", d[key], "a positive integer")
  require(0 < d.validation_fraction < 1, "data.validation_fraction", d.validation_fraction,
          "0 < f < 1")
  require(0 < d.dev_fraction < 1, "data.dev_fraction", d.dev_fraction, "0 < f < 1")
  common.validate_optimizer(o, tr.steps, d.batch_size)
  require(0 < o.layer_decay <= 1, "optimizer.layer_decay", o.layer_decay, "0 < decay <= 1")
  require(tr.steps >= 0, "train.steps", tr.steps,
          ">= 0 (0: evaluate only, e.g. zero-shot retrieval)")
  for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    require(tr[key] > 0, f"train.{key}", tr[key], "a positive integer")
  if "nonfinite" in tr:
    require(tr.nonfinite in common.NONFINITE_MODES, "train.nonfinite", tr.nonfinite,
            ", ".join(common.NONFINITE_MODES))
  for axis in common.MESH_AXES:
    require(config.mesh[axis] == -1 or config.mesh[axis] >= 1, f"mesh.{axis}", config.mesh[axis],
            "-1 (the remaining devices) or a positive integer")
  return config
