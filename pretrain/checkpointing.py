"""Orbax checkpoints holding everything needed to resume: train state, data-iterator state, config.

Restore order (see `train.train_and_evaluate`): the workdir's latest checkpoint (resume) > the
`config.init_from` parameters > a fresh initialisation. Orbax writes each step into a temporary
directory and renames it only when complete, so a kill mid-save never exposes a partial checkpoint;
older steps stay until `keep_checkpoints` newer complete ones exist.
"""
import json
import os

import grain
import orbax.checkpoint as ocp
from etils import epath

# Model fields that decide parameter shapes; a checkpoint is only resumed when they all match.
SHAPE_FIELDS = ("model.num_layers", "model.hidden_size", "model.num_heads", "model.mlp_dim",
                "model.max_len", "model.embedding_size", "data.tokenizer.vocab_size",
                "objective.name", "objective.generator_size_fraction")


class _IteratorSnapshot:
  """The data-iterator state captured at save time, so an async save never sees a later state."""

  def __init__(self, state):
    self._state = json.dumps(state).encode()

  def get_state(self):
    return self._state


def checkpoint_dir(workdir):
  """`<workdir>/checkpoints` as an absolute path (Orbax requires one; bucket URLs pass through)."""
  path = epath.Path(workdir) / "checkpoints"
  return path if "://" in os.fspath(workdir) else path.absolute()


def manager(workdir, train_config):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=train_config.keep_checkpoints,
      enable_async_checkpointing=train_config.async_checkpointing,
      create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers={"state": ocp.StandardCheckpointHandler(),
                                              "data": grain.checkpoint.CheckpointHandler(),
                                              "config": ocp.JsonCheckpointHandler()})


def save(mngr, step, state, data_iterator, config):
  """Starts an (async) save of `step`; the data state is captured now."""
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator.get_state())),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
  return mngr.save(step, args=args, force=True)


def saved_config(mngr, step=None):
  """The config dict stored with `step` (default: the latest)."""
  step = mngr.latest_step() if step is None else step
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def _lookup(d, dotted):
  for key in dotted.split("."):
    d = d[key]
  return d


def check_compatible(saved, config, where):
  """Raises naming the first shape-deciding field that differs between a checkpoint and config."""
  current = json.loads(config.to_json_best_effort())
  for field in SHAPE_FIELDS:
    old, new = _lookup(saved, field), _lookup(current, field)
    if old != new:
      raise ValueError(
          f"The checkpoint in {where} was trained with {field}={old!r} but the config says {new!r}. "
          f"Use --config.{field}={old!r} to resume it, or a new --workdir for a different model.")


def restore(mngr, abstract_state, data_iterator, config, workdir):
  """Restores the latest step into shardings given by `abstract_state`; None when there is none."""
  step = mngr.latest_step()
  if step is None:
    return None
  check_compatible(saved_config(mngr, step), config, workdir)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))
  return restored.state


def restore_state_only(mngr, abstract_state, step=None):
  """The train state of `step` (default latest), for export and `init_from`."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"No checkpoint found in {mngr.directory}; train first or check the path.")
  return mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state))).state


def copy_tokenizer(tokenizer_path, workdir):
  """Keeps the tokenizer beside the checkpoints so a workdir exports on its own."""
  target = epath.Path(workdir) / "tokenizer" / "spm.model"
  if not target.exists():
    target.parent.mkdir(parents=True, exist_ok=True)
    epath.Path(tokenizer_path).copy(target)
  return os.fspath(target)
