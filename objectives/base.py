"""The objective interface: what the train step needs from a pretraining objective.

The train step never changes when an objective is added (nanodo's loss factory, Levanter's loss
function): an objective is a small object of pure functions over explicit parameter and state trees.

Metrics are `(total, count)` pairs so that they average exactly across micro-batches, devices and
evaluation batches: the reported value is `sum(total) / sum(count)` (pretrain.training.step).
"""
import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from objectives import masking
from pretrain.models import encoder as enc

Params = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Guide:
  """A frozen encoder + pooler that scores in-batch candidates (GISTEmbed); built by the entry
  point (`pretrain.interop.load.load_guide`) and handed to the objective."""
  model_config: enc.EncoderConfig
  pooler_config: Any  # pretrain.models.poolers.PoolerConfig
  params: dict  # {"encoder": ..., "pooler": ...} numpy arrays


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen encoder, with its MLM head when it has one, that a student is distilled from
  (objectives/distill.py); built by the entry point (`pretrain.interop.load.load_teacher`)."""
  model_config: enc.EncoderConfig  # dropout off
  params: dict  # {"encoder": ...[, "mlm_head": ...]} numpy arrays
  path: str  # objective.teacher, for messages
  tokenizer_file: str  # "" when the directory has none
  pieces: Optional[tuple] = None  # its vocabulary in id order, when its tokenizer is readable


@dataclasses.dataclass(frozen=True)
class Resources:
  """What an objective needs from outside the objectives floor, built by the entry point:
  ERNIE-Gram's n-gram lexicon (`pretrain.data.ngrams.Lexicon`), a contrastive guide, a teacher."""
  lexicon: Any = None
  guide: Optional[Guide] = None
  teacher: Optional[Teacher] = None


# `Objective.input_format`: which input pipeline the entry point builds for an objective.
INPUT_FORMATS = (
    "packed",         # pretrain.data.pipeline: packed rows of input_ids / segment_ids / positions
    "packed_ngrams",  # the same + maximum-matching n-gram features (pretrain.data.ngrams)
    "pairs",          # pretrain.data.pairs: two views of a document, `dataset_options()` says which
)
# `Objective.export_format`: which Hugging Face architecture the export writes.
EXPORT_FORMATS = ("bert", "electra")


class Objective:
  """A pretraining objective over one shared encoder: every hook any caller uses, with defaults.

  Subclasses set `model_config` and implement `init`, `loss` and (when params["encoder"] is not
  the encoder) `encoder`; everything else has a default that fits an MLM-like objective.
  """

  # Batch fields the input pipeline must provide.
  features: tuple[str, ...] = ("input_ids", "segment_ids", "positions")
  # The `objective.*` config keys that decide this objective's array shapes: a resume that
  # changes one is refused with a message naming it (`checkpointing.check_compatible`).
  shape_fields: tuple[str, ...] = ()
  input_format: str = "packed"  # INPUT_FORMATS
  export_format: str = "bert"   # EXPORT_FORMATS
  # Config checks `validate(run_config)` runs: functions of the whole run config.
  checks: tuple = ()
  model_config: enc.EncoderConfig
  # ELECTRA's generator, exported beside the discriminator; None when there is none.
  generator_config: Optional[enc.EncoderConfig] = None
  # A trained pooler (pretrain.models.poolers.PoolerConfig) the sentence-transformers export uses.
  pooler_config: Any = None

  @classmethod
  def validate(cls, run_config) -> None:
    """Raises on a bad value of a key this objective reads (before anything compiles)."""
    for check in cls.checks:
      check(run_config)

  @classmethod
  def needs(cls, objective_config) -> frozenset:
    """The `Resources` fields this configuration needs built ("lexicon", "guide", "teacher")."""
    del objective_config
    return frozenset()

  def dataset_options(self) -> dict:
    """Keyword arguments of the input pipeline beyond the data config (view, query_len...)."""
    return {}

  def example_batch(self, seq_len: int) -> Batch:
    """What `init` traces: one row of every feature."""
    return {f: jnp.ones((1, seq_len), jnp.int32) for f in self.features}

  def init(self, rng: jax.Array, batch: Batch) -> Params:
    """Every trained parameter (encoder, heads, generator, decoder...), boxed with logical axes."""
    raise NotImplementedError

  def init_state(self) -> Any:
    """Non-gradient state (queues, EMA encoders, confusion counts); `{}` when there is none."""
    return {}

  def loss(self, params: Params, state: Any, batch: Batch, rng: jax.Array, *, train: bool
           ) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """Scalar loss to minimise, with `(metrics, new_state)`; corruption happens here, on device."""
    raise NotImplementedError

  def encoder(self, params: Params) -> Params:
    """The encoder parameters exported for fine-tuning."""
    return params["encoder"]

  def token_head(self, params: Params) -> Optional[Params]:
    """The MLM head over the token vocabulary that a BertForMaskedLM export carries, or None."""
    return params.get("mlm_head")

  def export_extras(self, out_dir: str, params: Params) -> None:
    """Writes what an export needs beyond the Hugging Face files (a decoder, a pooler)."""
    del out_dir, params

  def import_extras(self, model_dir: str, params: Params) -> Params:
    """`init_from=<export>`: `params` with what `export_extras` wrote there."""
    del model_dir
    return params


def mean_metric(values, weights):
  """A `(total, count)` metric pair from per-item values and 0/1 (or real) weights."""
  weights = weights.astype(jnp.float32)
  return jnp.sum(values.astype(jnp.float32) * weights), jnp.sum(weights)


class EncoderObjective(Objective):
  """Plumbing every objective over one shared `Encoder` needs: its module, masking, word starts."""

  checks = (masking.validate_config,)

  def __init__(self, config, model_config: enc.EncoderConfig, tokenizer,
               resources: Resources = Resources()):
    del resources
    self.config = config
    self.model_config = model_config
    self.encoder_module = enc.Encoder(model_config)
    self.special_ids = masking.SpecialIds.of(tokenizer)
    self.word_start_table = (tokenizer.word_start_table() if masking.uses_word_starts(config)
                             else None)

  def init_encoder(self, rng, batch):
    return self.encoder_module.init(rng, batch["input_ids"], batch["segment_ids"],
                                    batch["positions"])["params"]

  def encode(self, params, input_ids, batch, rng, train):
    """Final hidden states [B, L, H] of `input_ids` in the batch's packing."""
    return self.encoder_module.apply(
        {"params": params["encoder"]}, input_ids, batch["segment_ids"], batch["positions"],
        deterministic=not train, rngs={"dropout": rng})

  def mask(self, rng, input_ids):
    return masking.mask_with_config(rng, input_ids, self.config, self.model_config.vocab_size,
                                    self.word_start_table, self.special_ids)

