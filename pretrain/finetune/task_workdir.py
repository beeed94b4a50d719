"""A `pretrain.finetune` workdir read back as a model: a distillation teacher, or an init.

  is_task_workdir(path)       -> whether path holds fine-tuning checkpoints (not pretraining's)
  load_task_workdir(path)     -> TaskWorkdir(config, pretrained, params, labels, step)
  load_encoder(path, what)    -> pretrain.interop.load.Pretrained of any model path, fine-tuning
                                 workdirs included (their encoder; the head stays behind)

A fine-tuning workdir stores the train state and the config beside every step but neither the
encoder's architecture nor the tokenizer: both are those of its `config.init` (read from there
again, recursively when that is itself a fine-tuning workdir). The arrays are restored as stored,
their shapes read from the checkpoint's metadata, on one device: any task model (a distilled one
carries its teacher in the non-gradient state) reads without rebuilding its optimizer or objective.
"""
import dataclasses
import json
import os
from typing import Any, NamedTuple, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from pretrain.interop import load
from pretrain.training import checkpointing

RESULTS_FILE = "results.json"  # what a finished fine-tuning run writes (pretrain.finetune.train)


class TaskWorkdir(NamedTuple):
  config: ml_collections.ConfigDict  # the fine-tuning config saved with the step
  pretrained: load.Pretrained        # the encoder architecture, tokenizer and source of its init
  params: Any                        # {"encoder", "head"}: numpy arrays
  results: Optional[dict]            # results.json of a finished run (labels, scores), else None
  step: int


def _saved_config(workdir):
  mngr = checkpointing.read_manager(workdir)
  step = checkpointing.pick_step(mngr)
  return mngr, step, checkpointing.saved_config(mngr, step)


def is_task_workdir(path: str) -> bool:
  """A workdir whose saved config is a fine-tuning one (a `task`, no pretraining `objective`)."""
  if not load.is_workdir(path):
    return False
  try:
    _, _, saved = _saved_config(path)
  except FileNotFoundError:
    return False
  return "task" in saved and "objective" not in saved


def restore_params(mngr, step):
  """The `params` of a step's train state, restored as stored (shapes from its metadata)."""
  metadata = ocp.StandardCheckpointHandler().metadata(
      epath.Path(mngr.directory) / str(step) / "state")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        metadata)
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return jax.device_get(state.state["params"])


def load_task_workdir(path: str, what: str = "model path") -> TaskWorkdir:
  """The latest step of a fine-tuning workdir with the encoder config and tokenizer of its init."""
  mngr, step, saved = _saved_config(path)
  config = ml_collections.ConfigDict(saved)
  pretrained = load_encoder(config.init, what=f"{what}={path}: its config.init")
  results = None
  results_path = os.path.join(path, RESULTS_FILE)
  if os.path.isfile(results_path):
    with open(results_path, encoding="utf-8") as f:
      results = json.load(f)
  return TaskWorkdir(config, pretrained, restore_params(mngr, step), results, step)


def load_encoder(path: str, what: str = "model path") -> load.Pretrained:
  """`pretrain.interop.load.load_encoder`, and a fine-tuning workdir's encoder after its task."""
  if not (path and os.path.isdir(path) and is_task_workdir(path)):
    return load.load_encoder(path, what=what)
  task = load_task_workdir(path, what)
  return dataclasses.replace(task.pretrained, encoder=task.params["encoder"], source="finetuned",
                             description={"finetuned_on": task.config.data.source,
                                          "steps": task.step, "init": task.config.init})
