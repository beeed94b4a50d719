"""The objective interface: what the train step needs from a pretraining objective.

The train step never changes when an objective is added (nanodo's loss factory, Levanter's loss
function): an objective is a small object of pure functions over explicit parameter and state trees.

Metrics are `(total, count)` pairs so that they average exactly across micro-batches, devices and
evaluation batches: the reported value is `sum(total) / sum(count)`.
"""
from typing import Any, Mapping, Protocol

import jax
import jax.numpy as jnp

from objectives import masking
from pretrain.models import encoder as enc

Params = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, tuple[jax.Array, jax.Array]]


class Objective(Protocol):
  """A pretraining objective over one shared encoder."""

  # Batch fields the input pipeline must provide (e.g. "input_ids", "segment_ids", "positions").
  features: tuple[str, ...]
  # The `objective.*` config keys that decide this objective's array shapes: a resume that
  # changes one is refused with a message naming it (`pretrain.checkpointing.check_compatible`).
  shape_fields: tuple[str, ...]

  def init(self, rng: jax.Array, batch: Batch) -> Params:
    """Every trained parameter (encoder, heads, generator, decoder...), boxed with logical axes."""

  def init_state(self) -> Any:
    """Non-gradient state (queues, EMA encoders, confusion counts); `{}` when there is none."""

  def loss(self, params: Params, state: Any, batch: Batch, rng: jax.Array, *, train: bool
           ) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """Scalar loss to minimise, with `(metrics, new_state)`; corruption happens here, on device."""

  def encoder(self, params: Params) -> Params:
    """The encoder parameters exported for fine-tuning."""


def mean_metric(values, weights):
  """A `(total, count)` metric pair from per-item values and 0/1 (or real) weights."""
  weights = weights.astype(jnp.float32)
  return jnp.sum(values.astype(jnp.float32) * weights), jnp.sum(weights)


def metric_values(metrics: Metrics) -> dict[str, jax.Array]:
  """Reduces `(total, count)` pairs to their averages (0 where nothing was counted)."""
  return {k: t / jnp.maximum(c, 1e-9) for k, (t, c) in metrics.items()}


class EncoderObjective:
  """Plumbing every objective over one shared `Encoder` needs: its module, masking, word starts."""

  features = ("input_ids", "segment_ids", "positions")
  shape_fields = ()

  def __init__(self, config, model_config: enc.EncoderConfig, tokenizer):
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

  def init_state(self):
    return {}

  def encoder(self, params):
    return params["encoder"]
