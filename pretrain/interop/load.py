"""Loading any model path: a pretraining workdir, one of our exports, or a Hugging Face directory.

  load_workdir(workdir)  -> Workdir(config, tokenizer, objective, params, step), on one device
  load_encoder(path)     -> Pretrained(config, encoder, tokenizer_dir, source, description)
  load_guide(path)       -> objectives.base.Guide (a frozen encoder + pooler for GISTEmbed)
  load_teacher(path, L)  -> objectives.base.Teacher (a frozen encoder + MLM head to distill from)
  resources(config, ...) -> objectives.base.Resources that an objective needs from outside

Our export directories are read from flax_params.msgpack + encoder_config.json; Hugging Face
directories through the one reader, `hf_read`. Nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple, Optional

import flax.serialization
import jax
import ml_collections

from objectives import registry
from objectives import base
from pretrain.data import ngrams, tokenizer as tokenizer_lib
from pretrain.interop import files, hf_read, sentence_transformers
from pretrain.models import poolers, stacking
from pretrain.models.encoder import EncoderConfig
from pretrain.training import checkpointing, optimizer as optimizer_lib, sharding
from pretrain.training import state as state_lib


class Workdir(NamedTuple):
  config: ml_collections.ConfigDict
  tokenizer: Any
  objective: base.Objective
  params: Any
  step: int


def is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, checkpointing.CHECKPOINTS_DIR))


# What a model read back from a workdir or export runs its attention with (the default kernel),
# and without rematerialisation (model.remat, like the kernel, is how a run executed the layers).
PORTABLE_ATTENTION = {"attention": "xla", "attention_interpret": False, "remat": "none"}


def load_workdir(workdir: str, step: Optional[int] = None) -> Workdir:
  """A workdir's checkpoint (the latest, or `step`) with the objective that trained it, in the
  canonical layout: a scanned run's layers come unstacked (every layer_{i}), and its config and
  objective say model.scan_layers=False to match."""
  mngr = checkpointing.read_manager(workdir)
  step = checkpointing.pick_step(mngr, step)
  config = ml_collections.ConfigDict(checkpointing.saved_config(mngr, step))
  # The attention kernel is the training run's choice, not the model's: read back on any backend,
  # the model runs XLA's (a later run picks its own with model.attention).
  config.model.update({k: v for k, v in PORTABLE_ATTENTION.items() if k in config.model})
  # spm.model or tokenizer.json
  tokenizer = tokenizer_lib.load(os.path.join(workdir, checkpointing.TOKENIZER_DIR))
  # The lexicon only feeds the input pipeline; the guide is part of the checkpointed state.
  needed = resources(config, tokenizer, exclude={"lexicon"})
  objective = registry.build(config, tokenizer, needed)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  target, _ = state_lib.abstract_state(objective, tx, config.data.seq_len, mesh,
                                       sharding.rules(config.axis_rules))
  with jax.set_mesh(mesh):
    state = checkpointing.restore_state_only(mngr, target, step)
  params = jax.device_get(state.params)
  if config.model.get("scan_layers", False):
    params = stacking.unstack_all(params)
    config.model.scan_layers = False
    objective = registry.build(config, tokenizer, needed)
  return Workdir(config, tokenizer, objective, params, step)


@dataclasses.dataclass
class Pretrained:
  """An encoder to start from: its config and params, the tokenizer dir, where it came from."""
  config: EncoderConfig
  encoder: Any
  tokenizer_dir: str  # Holds spm.model or tokenizer.json.
  source: str  # "workdir", "export" or "hf:<model_type>".
  description: dict  # Objective, steps, ... for the fine-tuned model card.
  heads: dict = dataclasses.field(default_factory=dict)  # "mlm_head" when the model has one

  def tokenizer(self):
    """The tokenizer; our exports carry spm.model beside a tokenizer.json that only AutoTokenizer
    reads, and the former is preferred."""
    spm = os.path.join(self.tokenizer_dir, tokenizer_lib.SPM_FILE)
    return tokenizer_lib.load(spm if os.path.isfile(spm) else self.tokenizer_dir)


def is_our_export(path: str) -> bool:
  return all(os.path.isfile(os.path.join(path, f))
             for f in (files.MSGPACK_FILE, files.ENCODER_CONFIG_FILE))


def read_export(path: str) -> tuple[EncoderConfig, dict]:
  """(config, the full params tree) of an export dir's flax_params.msgpack + encoder_config.json."""
  with open(os.path.join(path, files.ENCODER_CONFIG_FILE), encoding="utf-8") as f:
    fields = json.load(f)
  known = {f.name for f in dataclasses.fields(EncoderConfig)}
  config = EncoderConfig(**{**{k: v for k, v in fields.items() if k in known},
                            **PORTABLE_ATTENTION})
  with open(os.path.join(path, files.MSGPACK_FILE), "rb") as f:
    try:
      params = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on bad bytes.
      raise ValueError(f"{path}/{files.MSGPACK_FILE}: cannot decode ({type(e).__name__}: {e}); "
                       "export the workdir again.") from None
  if "encoder" not in params:
    raise ValueError(f"{path}/{files.MSGPACK_FILE} has no 'encoder' entry (top-level keys: "
                     f"{sorted(params)}); it is not a pretrain.export file.")
  return config, params


def load_encoder(path: str, step: Optional[int] = None, what: str = "model path") -> Pretrained:
  """The encoder at `path`: a pretraining workdir (its latest checkpoint, or `step`), our export
  dir, or a Hugging Face BERT / ELECTRA / RoBERTa / ModernBERT dir; errors name `what` (the config
  key)."""
  if not path:
    raise FileNotFoundError(f"{what} is empty; give a pretraining workdir, a pretrain.export "
                            "directory or a Hugging Face model directory.")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what}={path!r} is not a directory; give a pretraining workdir, a "
                            "pretrain.export directory or a Hugging Face model directory.")
  if is_workdir(path):
    w = load_workdir(path, step)
    head = w.objective.token_head(w.params)
    return Pretrained(w.objective.model_config, w.objective.encoder(w.params),
                      os.path.join(path, checkpointing.TOKENIZER_DIR), "workdir",
                      {"objective": w.config.objective.name, "steps": w.step,
                       "data": w.config.data.name}, {} if head is None else {"mlm_head": head})
  if is_our_export(path):
    config, params = read_export(path)
    return Pretrained(config, params["encoder"], path, "export", {},
                      {k: params[k] for k in ("mlm_head",) if k in params})
  if os.path.isfile(os.path.join(path, files.CONFIG_FILE)):
    imported = hf_read.read_hf_encoder(path)
    return Pretrained(imported.config, imported.encoder, path, f"hf:{imported.model_type}", {},
                      {k: v for k, v in imported.heads.items() if k == "mlm_head"})
  raise FileNotFoundError(
      f"{what}={path} is none of: a pretraining workdir ({checkpointing.CHECKPOINTS_DIR}/), a "
      f"pretrain.export directory ({files.MSGPACK_FILE} + {files.ENCODER_CONFIG_FILE}), a Hugging "
      f"Face model directory ({files.CONFIG_FILE} + {files.WEIGHTS_FILE}).")


def load_guide(path, guide_pooler="auto") -> base.Guide:
  """A frozen guide from anything `load_encoder` reads; it always scores by cosine.

  Pooler: with guide_pooler="auto", an export's pooler.json (as trained), else the pooling of a
  sentence-transformers 1_Pooling/config.json (all-MiniLM-L6-v2: mean), else mean.
  """
  pretrained = load_encoder(path, what="objective.guide")
  model_config = dataclasses.replace(pretrained.config, dropout_rate=0.0)
  saved_pooler = poolers.load(path)
  if guide_pooler == "auto" and saved_pooler is not None:
    pooler_config, pooler_params = saved_pooler
    pooler_config = dataclasses.replace(pooler_config, normalize=True)
  else:
    kind = (guide_pooler if guide_pooler != "auto"
            else sentence_transformers.read_pooling(path) or "mean")
    pooler_config, pooler_params = poolers.PoolerConfig(
        kind=kind, hidden_size=model_config.hidden_size, num_layers=model_config.num_layers,
        normalize=True), {}
  return base.Guide(model_config, pooler_config,
                    {"encoder": pretrained.encoder, "pooler": pooler_params})


def load_teacher(path, seq_len) -> base.Teacher:
  """A frozen distillation teacher (dropout off) from anything `load_encoder` reads, with its MLM
  head when it has one and its vocabulary (for the student's same-tokenizer check)."""
  pretrained = load_encoder(path, what="objective.teacher")
  config = dataclasses.replace(pretrained.config, dropout_rate=0.0)
  if config.position == "learned" and config.max_len < seq_len:
    raise ValueError(f"objective.teacher={path!r} has {config.max_len} positions but "
                     f"data.seq_len={seq_len}; use data.seq_len <= {config.max_len}.")
  try:
    tokenizer = pretrained.tokenizer()
  except (FileNotFoundError, ValueError):  # No tokenizer file: only the sizes can be compared.
    return base.Teacher(config, {"encoder": pretrained.encoder, **pretrained.heads}, path, "")
  pieces = tuple(tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size))
  return base.Teacher(config, {"encoder": pretrained.encoder, **pretrained.heads}, path,
                      tokenizer.model_path, pieces)


def lexicon(config, tokenizer):
  """ERNIE-Gram's n-gram lexicon of the run's train split (built once, then read back)."""
  o = config.objective
  return ngrams.load_or_build(
      config.data, tokenizer, size=o.ngram_vocab_size, max_n=o.ngram_max_n,
      min_count=o.ngram_min_count, score=o.ngram_score,
      max_train_bytes=o.ngram_max_train_bytes or config.data.tokenizer.max_train_bytes)


def resources(config, tokenizer, exclude=frozenset()) -> base.Resources:
  """What `registry.needs(config.objective)` asks for, less `exclude`."""
  wanted = registry.needs(config.objective) - set(exclude)
  return base.Resources(
      lexicon=lexicon(config, tokenizer) if "lexicon" in wanted else None,
      guide=(load_guide(config.objective.guide, config.objective.guide_pooler)
             if "guide" in wanted else None),
      teacher=(load_teacher(config.objective.teacher, config.data.seq_len)
               if "teacher" in wanted else None))
