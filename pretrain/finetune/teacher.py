"""The teacher of task distillation: a finished `pretrain.finetune` workdir of the same task.

`load_teacher(config, ...)` reads `config.teacher` (`pretrain.finetune.task_workdir`) and checks,
before anything compiles, that its predictions mean what the student's labels mean: the same task
(data source and files), head, label names in the same order and class count, and the same
tokenizer (the teacher reads the student's token ids inside the train step). Each refusal is one
line naming config.teacher and the fix.
"""
import dataclasses
import os
from typing import Any, NamedTuple

from pretrain.data import tokenizer as tokenizer_lib
from pretrain.finetune import heads, task_workdir

# Saved config keys that say which rows and labels the teacher was trained on.
TASK_FIELDS = ("data.source", "data.name", "data.train", "data.label_field", "task.head",
               "data.num_exception_types")


class Teacher(NamedTuple):
  model: Any   # a heads task model (dropout off)
  params: Any  # {"encoder", "head"}: numpy arrays
  path: str
  results: dict  # the teacher run's results.json


def _get(config, dotted):
  for key in dotted.split("."):
    config = config.get(key) if hasattr(config, "get") else None
  return config


def tokenizer_bytes(model_dir):
  """The tokenizer file a model dir tokenizes with (spm.model first, as fine-tuning reads it)."""
  for name in (tokenizer_lib.SPM_FILE, tokenizer_lib.HF_FILE):
    path = os.path.join(model_dir, name)
    if os.path.isfile(path):
      with open(path, "rb") as f:
        return name, f.read()
  return None, None


def _refuse(path, problem, fix):
  raise ValueError(f"config.teacher={path}: {problem}; {fix}.")


def check_teacher(path, task, config, label_names, num_classes, tokenizer_dir):
  """Raises (one line naming config.teacher) unless `task` can teach this run's task."""
  train_fix = (f"fine-tune a teacher on this task first (python -m pretrain.finetune with this "
               f"run's task config and --workdir={path})")
  t = task.config
  if task.results is None or task.step < t.train.steps:
    _refuse(path, f"its fine-tuning has not finished (step {task.step} of {t.train.steps}, no "
            f"{task_workdir.RESULTS_FILE})", "rerun its fine-tuning command to finish it")
  for field in TASK_FIELDS:
    theirs, ours = _get(t, field), _get(config, field)
    if theirs != ours:
      _refuse(path, f"it was fine-tuned with {field}={theirs!r} but this run has {ours!r}",
              train_fix)
  if list(task.results.get("labels") or []) != list(label_names or []):
    _refuse(path, f"its labels {task.results.get('labels')} differ from this run's "
            f"{list(label_names or [])}", "give it the same label set (task.labels) or "
            + train_fix)
  teacher_classes = task.params["head"]["out"]["kernel"].shape[-1]
  if teacher_classes != num_classes:
    _refuse(path, f"its head has {teacher_classes} classes but this run {num_classes}",
            "set task.num_classes as the teacher had it or " + train_fix)
  theirs, ours = tokenizer_bytes(task.pretrained.tokenizer_dir), tokenizer_bytes(tokenizer_dir)
  if theirs != ours:
    _refuse(path, f"its tokenizer ({task.pretrained.tokenizer_dir}) is not this run's "
            f"({tokenizer_dir}), so it would read other token ids",
            "fine-tune the teacher from a model with the student's tokenizer, or start the "
            "student (config.init) from one with the teacher's")
  if task.pretrained.config.max_len < config.data.seq_len:
    _refuse(path, f"its encoder has {task.pretrained.config.max_len} positions, fewer than "
            f"data.seq_len={config.data.seq_len}", "lower data.seq_len")


def load_teacher(config, label_names, num_classes, tokenizer_dir) -> Teacher:
  """The checked teacher of `config.teacher` for a run of `num_classes` over `label_names`."""
  path = config.teacher
  if not (os.path.isdir(path) and task_workdir.is_task_workdir(path)):
    _refuse(path, "not a pretrain.finetune workdir (no fine-tuning checkpoints there)",
            "fine-tune a teacher on this task first (python -m pretrain.finetune "
            f"--workdir={path}) or fix the path")
  task = task_workdir.load_task_workdir(path, what="config.teacher")
  check_teacher(path, task, config, label_names, num_classes, tokenizer_dir)
  tc = task.config.task
  model = heads.make(tc.head, dataclasses.replace(task.pretrained.config, dropout_rate=0.0),
                     num_classes=num_classes, pooling=tc.pooling, use_token_types=tc.token_types)
  return Teacher(model, task.params, path, task.results)
