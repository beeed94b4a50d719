"""ELECTRA (Clark et al., 2020): a small MLM generator makes replacements; the encoder detects them.

As in the official code:
- The generator is an encoder of the same depth with hidden = discriminator hidden *
  generator_size_fraction (1/4 small, 1/3 base), MLP 4x its hidden (we keep the discriminator's
  MLP ratio, which is 4 in every paper size) and heads chosen so head_dim stays the
  discriminator's (64 in every paper size; the official code divides by 64).
- Both networks run on ONE set of token, position and token-type embeddings (and their LayerNorm):
  the arrays live in params["encoder"]["embeddings"] and the generator reads them through
  `Encoder(..., shared_embeddings=...)`, so their gradient sums both networks' contributions.
  Each network has its own `embeddings_project` when its hidden size differs from embedding_size.
- The generator's MLM head maps hidden -> embedding_size and is tied to the shared word embeddings
  (HF ElectraGeneratorPredictions + generator_lm_head).
- Masking is dynamic and on device: 15% of the tokens, of which 85% [MASK], 15% unchanged, no random
  token (configs/electra.py sets these rates; the objective reads objective.mask_token_rate).
- Replacements are Gumbel-max samples at temperature 1 from the generator's logits with
  stop_gradient, drawn only at the masked slots and scattered back; a sample equal to the original
  is labelled "real" (the official disallow_correct=False).
- Loss = generator_weight * MLM + discriminator_weight * BCE (defaults 1 and 50).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from objectives import base, checks, detection, mlm
from pretrain.models import encoder as enc

CONFIG = dict(
    generator_size_fraction=0.25,  # generator hidden = model.hidden_size * this
    generator_weight=1.0,          # weight of the generator's MLM loss
)


def generator_config(model_config: enc.EncoderConfig, fraction: float) -> enc.EncoderConfig:
  """The generator's EncoderConfig: narrower, same depth, same embedding tables."""
  if not 0 < fraction <= 1:
    raise ValueError(f"objective.generator_size_fraction must be in (0, 1], got {fraction!r}.")
  hidden = int(round(model_config.hidden_size * fraction))
  if hidden < 1:
    raise ValueError(f"objective.generator_size_fraction={fraction} leaves the generator no hidden "
                     f"units (discriminator hidden {model_config.hidden_size}); raise it.")
  heads = max(1, hidden // model_config.head_dim)
  while hidden % heads:  # Only for unusual sizes: keep a head count that divides hidden.
    heads -= 1
  mlp = max(1, round(model_config.mlp_dim * hidden / model_config.hidden_size))
  return dataclasses.replace(model_config, hidden_size=hidden, num_heads=heads, mlp_dim=mlp,
                             embedding_size=model_config.embed_dim)


def gumbel_max_sample(rng, logits_BMV):
  """One categorical sample per slot: argmax(logits + Gumbel noise) ~ softmax(logits)."""
  noise = jax.random.gumbel(rng, logits_BMV.shape, jnp.float32)
  return jnp.argmax(logits_BMV.astype(jnp.float32) + noise, axis=-1).astype(jnp.int32)


def scatter_slots(input_ids_BL, positions_BM, values_BM, weights_BM):
  """input_ids with `values` written at the real slots (padding slots, which point at 0, add 0)."""
  current_BM = jnp.take_along_axis(input_ids_BL, positions_BM, 1)
  delta_BM = jnp.where(weights_BM > 0, values_BM - current_BM, 0).astype(input_ids_BL.dtype)
  rows_B1 = jnp.arange(input_ids_BL.shape[0])[:, None]
  return input_ids_BL.at[rows_B1, positions_BM].add(delta_BM)


def validate_config(config):
  m, o = config.model, config.objective
  checks.require(0 < o.generator_size_fraction <= 1 and o.generator_size_fraction * m.hidden_size >= 1,
                 "objective.generator_size_fraction", o.generator_size_fraction,
                 f"0 < f <= 1 with f * model.hidden_size={m.hidden_size} >= 1")
  checks.require(o.generator_weight >= 0 and o.discriminator_weight >= 0
                 and o.generator_weight + o.discriminator_weight > 0, "objective.generator_weight",
                 (o.generator_weight, o.discriminator_weight),
                 "generator and discriminator weights >= 0, not both 0")


class Electra(detection.Detector):
  """Generator + discriminator over shared embeddings.

  Params: encoder (the discriminator, exported for fine-tuning), discriminator_head,
  generator (an Encoder tree without embeddings), generator_head (MlmHead of generator_config).
  """

  shape_fields = ("objective.generator_size_fraction",)
  checks = (*detection.Detector.checks, validate_config)

  def __init__(self, config, model_config: enc.EncoderConfig, tokenizer, resources=base.Resources()):
    super().__init__(config, model_config, tokenizer, resources)
    self.generator_config = generator_config(model_config, config.generator_size_fraction)
    self.generator_module = enc.Encoder(self.generator_config)
    self.generator_head = enc.MlmHead(self.generator_config)

  def init(self, rng, batch):
    det_rng, gen_rng, head_rng = jax.random.split(rng, 3)
    params = super().init(det_rng, batch)
    ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
    shared = nn.unbox(params["encoder"]["embeddings"])
    generator = self.generator_module.init(gen_rng, ids, seg, pos,
                                           shared_embeddings=shared)["params"]
    hidden = jnp.zeros((ids.shape[0], 1, self.generator_config.hidden_size))
    table = enc.word_embedding_table(params["encoder"])
    head = self.generator_head.init(head_rng, hidden, table)["params"]
    return {**params, "generator": generator, "generator_head": head}

  def generate(self, params, masked, batch, rng, train):
    """Generator logits [B, M, V] at the masked slots."""
    shared = params["encoder"]["embeddings"]
    hidden = self.generator_module.apply(
        {"params": params["generator"]}, masked.input_ids, batch["segment_ids"],
        batch["positions"], deterministic=not train, rngs={"dropout": rng},
        shared_embeddings=shared)
    return self.generator_head.apply(
        {"params": params["generator_head"]}, enc.gather_positions(hidden, masked.positions),
        enc.word_embedding_table(params["encoder"]))

  def loss(self, params, state, batch, rng, *, train):
    mask_rng, gen_rng, sample_rng, disc_rng = jax.random.split(rng, 4)
    ids = batch["input_ids"]
    masked = self.mask(mask_rng, ids)
    logits_BMV = self.generate(params, masked, batch, gen_rng, train)
    gen_loss, metrics = mlm.mlm_loss_and_metrics(logits_BMV, masked.targets, masked.weights,
                                                 prefix="generator_mlm")
    sampled_BM = gumbel_max_sample(sample_rng, jax.lax.stop_gradient(logits_BMV))
    corrupted_BL = scatter_slots(ids, masked.positions, sampled_BM, masked.weights)
    disc_logits_BL = self.detect(params, corrupted_BL, batch, disc_rng, train)
    disc_loss, disc_metrics = detection.detection_loss_and_metrics(
        disc_logits_BL, corrupted_BL != ids, batch["segment_ids"] > 0)
    loss = self.config.generator_weight * gen_loss + self.config.discriminator_weight * disc_loss
    metrics.update(disc_metrics, total_loss=base.mean_metric(loss, jnp.ones(())))
    return loss, (metrics, state)
