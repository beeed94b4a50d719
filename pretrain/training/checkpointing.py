"""Orbax checkpoints holding everything needed to resume: train state, data-iterator state, config.

Restore order (see `train.train_and_evaluate`): the workdir's latest checkpoint (resume) > the
`config.init_from` parameters > a fresh initialisation. Orbax writes each step into a temporary
directory and renames it only when complete, so a kill mid-save never exposes a partial checkpoint;
older steps stay until `keep_checkpoints` newer complete ones exist.

What can still go wrong, and what happens then:
  * a committed step later fails to read (a file truncated or lost on disk): `restore` warns naming
    it, moves it to <workdir>/checkpoints_unreadable/ and resumes from the newest step that reads;
  * a save fails (full disk, a failing writer): `save` / `wait` raise OSError naming the newest
    complete step, which stays intact and is where a rerun resumes.
Everything is read with Orbax (tensorstore arrays, JSON metadata), grain (JSON) and JSON: no pickle,
so loading an untrusted checkpoint cannot run code.
"""
import json
import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"  # the workdir's copy of the run's tokenizer
UNREADABLE_DIR = "checkpoints_unreadable"

# The config keys that decide array shapes under every objective; a checkpoint is only resumed when
# they all match. Each objective adds its own (`shape_fields`), so a key that only another
# objective reads never blocks a resume.
SHAPE_FIELDS = ("model.num_layers", "model.hidden_size", "model.num_heads", "model.mlp_dim",
                "model.max_len", "model.embedding_size", "data.tokenizer.vocab_size",
                "objective.name",
                # The architecture: most change parameter shapes; the rest (RoPE bases, windows)
                # change what the weights mean. A context extension is a new run (init_from).
                "model.position", "model.rope_theta", "model.rope_local_theta", "model.mlp",
                "model.pre_norm", "model.norm", "model.norm_bias", "model.use_bias",
                "model.type_vocab_size", "model.layer_norm_eps", "model.local_window",
                "model.global_every", "model.mlm_head", "model.vocab_multiple",
                # The parameters' layout: stacked layers (LAYOUT_FIELDS).
                "model.scan_layers")
# Shape fields that only lay the same weights out differently: init_from converts them.
LAYOUT_FIELDS = ("model.scan_layers",)

# Config keys that decide what the data iterator's saved position means (it counts rows of this
# shape): resuming with others would not continue the same data order.
DATA_FIELDS = ("data.seq_len", "data.batch_size")


class _IteratorSnapshot:
  """The data-iterator state captured at save time, so an async save never sees a later state."""

  def __init__(self, state):
    self._state = json.dumps(state).encode()

  def get_state(self):
    return self._state


def checkpoint_dir(workdir):
  """`<workdir>/checkpoints` as an absolute path (Orbax requires one; bucket URLs pass through)."""
  path = epath.Path(workdir) / CHECKPOINTS_DIR
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


def read_manager(workdir, what="--workdir"):
  """A manager over a workdir's existing checkpoints, for reading: a path without them is an
  error naming `what` (Orbax would create the directory at a mistyped path)."""
  directory = checkpoint_dir(workdir)
  if not directory.is_dir():
    raise FileNotFoundError(f"{what}={workdir}: no {CHECKPOINTS_DIR}/ directory there, so it is not "
                            "a pretraining workdir; check the path (pretrain.main writes one).")
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False, read_only=True))


def pick_step(mngr, step=None, what="--step"):
  """`step` if the manager holds it, else the latest; an error lists the steps there are."""
  steps = sorted(mngr.all_steps())
  if not steps:
    raise FileNotFoundError(f"No checkpoint in {mngr.directory}; train first or check the path.")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"{what}={step}: {mngr.directory} has no such checkpoint; available "
                            f"steps: {', '.join(map(str, steps))}.")
  return step


def save(mngr, step, state, data_iterator, config):
  """Starts an (async) save of `step`; the data state is captured now."""
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator.get_state())),
      config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
  try:
    return mngr.save(step, args=args, force=True)
  except Exception as e:  # This save, or the previous async one, failed to write.
    raise _save_error(mngr, e) from e


def wait(mngr):
  """Waits for the last async save; a failed one raises like `save`."""
  try:
    mngr.wait_until_finished()
  except Exception as e:
    raise _save_error(mngr, e) from e


def _save_error(mngr, error):
  mngr.reload()  # Orbax has dropped the failed step; what remains on disk is complete.
  return OSError(f"Writing a checkpoint in {mngr.directory} failed ({type(error).__name__}: "
                 f"{error}). The newest complete checkpoint, step {mngr.latest_step()}, is intact: "
                 f"free disk space (or fix the storage) and rerun the same command to resume from it.")


def saved_config(mngr, step=None):
  """The config dict stored with `step` (default: the latest)."""
  step = mngr.latest_step() if step is None else step
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


_MISSING = object()


def _lookup(d, dotted):
  for key in dotted.split("."):
    if not isinstance(d, dict) or key not in d:
      return _MISSING
    d = d[key]
  return d


def check_compatible(saved, config, where, fields=SHAPE_FIELDS):
  """Raises naming the first shape-deciding field that differs between a checkpoint and config."""
  current = json.loads(config.to_json_best_effort())
  for field in fields:
    old, new = _lookup(saved, field), _lookup(current, field)
    if old is _MISSING and field in LAYOUT_FIELDS:
      old = False  # Saved before layers could be stacked: unstacked.
    if old is _MISSING:
      continue  # A config saved without the key; restoring still checks every array's shape.
    if old != new and field in DATA_FIELDS:
      raise ValueError(
          f"The checkpoint in {where} was trained with {field}={old!r} but the config says {new!r}; "
          f"its data position counts rows of the old shape. Use --config.{field}={old!r} to "
          f"resume it, or a new --workdir with --config.init_from={where} to continue from its "
          f"weights with the new {field}.")
    if old != new and field in LAYOUT_FIELDS:
      raise ValueError(
          f"The checkpoint in {where} was trained with {field}={old!r} but the config says {new!r}; "
          f"its parameters are stored in that layout. Use --config.{field}={old!r} to resume it, "
          f"or a new --workdir with --config.init_from={where}, which converts the layout.")
    if old != new:
      raise ValueError(
          f"The checkpoint in {where} was trained with {field}={old!r} but the config says {new!r}. "
          f"Use --config.{field}={old!r} to resume it, or a new --workdir for a different model.")


def restore(mngr, abstract_state, data_iterator, config, workdir, fields=SHAPE_FIELDS):
  """Restores the newest readable step into shardings given by `abstract_state` (None: no step).

  A step that fails to read is set aside (see the module docstring) once an older one has read; a
  model-shape mismatch (in `fields`, the config keys that decide shapes; fine-tuning has its own)
  raises at once; when no step reads, the error lists each step's failure.
  """
  failed = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      saved, metadata = saved_config(mngr, step), _state_metadata(mngr, step)
    except Exception as e:  # pylint: disable=broad-except
      failed.append((step, e))
      continue
    check_compatible(saved, config, workdir, fields)
    check_shapes(metadata, abstract_state, workdir)  # Not corruption: another model or version.
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:  # pylint: disable=broad-except
      failed.append((step, e))
      continue
    if failed:
      _set_aside(mngr, workdir, [s for s, _ in failed], step, failed[0][1])
    return restored.state
  if failed:
    raise RuntimeError(
        f"No checkpoint in {mngr.directory} can be read: " +
        "; ".join(f"step {s}: {type(e).__name__}: {str(e)[:300]}" for s, e in failed) +
        ". If they were written by an older version of this code, resume with that version; "
        "otherwise move the checkpoints directory away to start afresh.")
  return None


def _set_aside(mngr, workdir, steps, restored_step, error):
  """Moves unreadable steps out of the way (kept for inspection) so later saves can reuse them."""
  logging.warning("Checkpoint step(s) %s in %s cannot be read (%s: %s); resumed from step %d "
                  "instead and moved them to %s.", steps, mngr.directory, type(error).__name__,
                  str(error)[:300], restored_step, epath.Path(workdir) / UNREADABLE_DIR)
  if jax.process_index() == 0:
    for step in steps:
      target = epath.Path(workdir) / UNREADABLE_DIR / str(step)
      if target.exists():
        target.rmtree()
      target.parent.mkdir(parents=True, exist_ok=True)
      (epath.Path(mngr.directory) / str(step)).rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("checkpointing: unreadable steps set aside")
  mngr.reload()


def restore_state_only(mngr, abstract_state, step=None):
  """The train state of `step` (default latest), for export and `init_from`."""
  step = pick_step(mngr, step)
  try:
    metadata = _state_metadata(mngr, step)
  except Exception as e:
    raise _unreadable(mngr, step, e) from e
  check_shapes(metadata, abstract_state, mngr.directory)
  try:
    return mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state
  except Exception as e:
    raise _unreadable(mngr, step, e) from e


def _unreadable(mngr, step, error):
  return ValueError(
      f"Checkpoint step {step} in {mngr.directory} cannot be restored ({type(error).__name__}: "
      f"{str(error)[:500]}); it is corrupt or incomplete: pick another step (available: "
      f"{list(mngr.all_steps())}).")


def _state_metadata(mngr, step):
  """The array shapes stored for the train state of `step` (read from its metadata only)."""
  return ocp.StandardCheckpointHandler().metadata(epath.Path(mngr.directory) / str(step) / "state")


def _dotted(path):
  return ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def check_shapes(metadata, abstract_state, where):
  """Raises naming the first array whose shape (or presence) differs between a checkpoint's
  metadata and `abstract_state`, before Orbax fails on it less clearly."""
  saved = {_dotted(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(metadata)[0]
           if hasattr(x, "shape")}
  expected = {_dotted(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  for name in sorted(set(saved) ^ set(expected)):
    held, wanted = ("holds", "has no") if name in saved else ("has no", "needs")
    raise ValueError(
        f"The checkpoint in {where} {held} {name} but this run {wanted} it: it was written by "
        f"another version of this code or for another objective; resume it with that version, or "
        f"use a new --workdir.")
  for name, shape in expected.items():
    if saved[name] != shape:
      raise ValueError(
          f"The checkpoint in {where} holds {name} with shape {saved[name]} but this model's is "
          f"{shape}: config.model (or data.tokenizer.vocab_size) differs from the run that wrote "
          f"it; use that run's config (saved beside each step, in <step>/config) or a new --workdir.")


def copy_tokenizer(tokenizer_path, workdir):
  """Keeps the tokenizer beside the checkpoints so a workdir exports on its own.

  A sentencepiece model becomes tokenizer/spm.model, a Hugging Face one tokenizer/tokenizer.json;
  `tokenizer.load(<workdir>/tokenizer)` finds either.
  A workdir whose copy differs from `tokenizer_path` was trained with another tokenizer: resuming
  would feed its embeddings other token ids, so that is an error.
  """
  name = "tokenizer.json" if os.fspath(tokenizer_path).endswith(".json") else "spm.model"
  target = epath.Path(workdir) / TOKENIZER_DIR / name
  source = epath.Path(tokenizer_path)
  if not target.exists():
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{name}.tmp{os.getpid()}"
    source.copy(tmp, overwrite=True)
    tmp.rename(target)  # Atomic: a kill mid-copy never leaves half a tokenizer in the workdir.
  elif target.read_bytes() != source.read_bytes():
    raise ValueError(
        f"The tokenizer {tokenizer_path} differs from {target}, the one this workdir was trained "
        f"with; set --config.data.tokenizer.path={target} to continue with it, or use a new "
        f"--workdir for the new tokenizer.")
  return os.fspath(target)
