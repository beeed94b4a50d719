"""Masked language modelling (BERT; CuBERT on code): the objective every other one is measured against.

Dynamic masking on device (15%, 80/10/10), optionally of whole words (sentencepiece's word marker),
and a tied output head that runs only at the selected positions.
"""
import jax
import jax.numpy as jnp
import optax

from objectives import base
from pretrain.models import encoder as enc


def top1_correct(logits_BMV, targets_BM):
  """Whether each target holds the largest logit: argmax == target, except that a target tied
  with an earlier maximum also counts. A max and a comparison, not an argmax: XLA:CPU's index
  reduction over the vocabulary is far slower than a plain max (README, Performance)."""
  target_BM = jnp.take_along_axis(logits_BMV, targets_BM[..., None], -1)[..., 0]
  return target_BM >= jnp.max(logits_BMV, -1)


def mlm_loss_and_metrics(logits_BMV, targets_BM, weights_BM, prefix="mlm"):
  """Mean cross-entropy over the real slots, and the `(total, count)` metrics."""
  logits = logits_BMV.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BM)
  loss = jnp.sum(ce * weights_BM) / jnp.maximum(jnp.sum(weights_BM), 1.0)
  correct = top1_correct(logits, targets_BM)
  return loss, {f"{prefix}_loss": base.mean_metric(ce, weights_BM),
                f"{prefix}_accuracy": base.mean_metric(correct, weights_BM)}


class MaskedLM(base.EncoderObjective):
  """BERT masked LM over the shared encoder."""

  def __init__(self, config, model_config: enc.EncoderConfig, tokenizer, resources=base.Resources()):
    super().__init__(config, model_config, tokenizer, resources)
    self.head_module = enc.MlmHead(model_config)

  def init(self, rng, batch):
    enc_rng, head_rng = jax.random.split(rng)
    encoder = self.init_encoder(enc_rng, batch)
    hidden = jnp.zeros((batch["input_ids"].shape[0], 1, self.model_config.hidden_size))
    table = jnp.zeros((self.model_config.vocab_size, self.model_config.embed_dim))
    head = self.head_module.init(head_rng, hidden, table)["params"]
    return {"encoder": encoder, "mlm_head": head}

  def predict(self, params, masked, batch, rng, train):
    """Logits [B, M, V] at the masked slots."""
    hidden = self.encode(params, masked.input_ids, batch, rng, train)
    selected = enc.gather_positions(hidden, masked.positions)
    return self.head_module.apply({"params": params["mlm_head"]}, selected,
                                  enc.word_embedding_table(params["encoder"]))

  def loss(self, params, state, batch, rng, *, train):
    mask_rng, dropout_rng = jax.random.split(rng)
    masked = self.mask(mask_rng, batch["input_ids"])
    logits = self.predict(params, masked, batch, dropout_rng, train)
    loss, metrics = mlm_loss_and_metrics(logits, masked.targets, masked.weights)
    return loss, (metrics, state)
