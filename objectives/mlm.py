"""Masked language modelling (BERT; CuBERT on code): the objective every other one is measured against.

Dynamic masking on device (15%, 80/10/10), optionally of whole words (sentencepiece's word marker),
and a tied output head that runs only at the selected positions.
"""
import jax
import jax.numpy as jnp
import optax

from objectives import base, masking
from pretrain.models import encoder as enc


def mlm_loss_and_metrics(logits_BMV, targets_BM, weights_BM, prefix="mlm"):
  """Mean cross-entropy over the real slots, and the `(total, count)` metrics."""
  logits = logits_BMV.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BM)
  loss = jnp.sum(ce * weights_BM) / jnp.maximum(jnp.sum(weights_BM), 1.0)
  correct = jnp.argmax(logits, -1) == targets_BM
  return loss, {f"{prefix}_loss": base.mean_metric(ce, weights_BM),
                f"{prefix}_accuracy": base.mean_metric(correct, weights_BM)}


class MaskedLM:
  """BERT masked LM over the shared encoder."""

  features = ("input_ids", "segment_ids", "positions")

  def __init__(self, config, model_config: enc.EncoderConfig, tokenizer):
    self.config = config
    self.model_config = model_config
    self.encoder_module = enc.Encoder(model_config)
    self.head_module = enc.MlmHead(model_config)
    self.word_start_table = tokenizer.word_start_table() if config.whole_word else None

  def init(self, rng, batch):
    enc_rng, head_rng = jax.random.split(rng)
    ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
    encoder = self.encoder_module.init(enc_rng, ids, seg, pos)["params"]
    hidden = jnp.zeros((ids.shape[0], 1, self.model_config.hidden_size))
    table = jnp.zeros((self.model_config.vocab_size, self.model_config.hidden_size))
    head = self.head_module.init(head_rng, hidden, table)["params"]
    return {"encoder": encoder, "mlm_head": head}

  def init_state(self):
    return {}

  def mask(self, rng, input_ids):
    return masking.mask_with_config(rng, input_ids, self.config, self.model_config.vocab_size,
                                    self.word_start_table)

  def predict(self, params, masked, batch, rng, train):
    """Logits [B, M, V] at the masked slots."""
    hidden = self.encoder_module.apply(
        {"params": params["encoder"]}, masked.input_ids, batch["segment_ids"], batch["positions"],
        deterministic=not train, rngs={"dropout": rng})
    selected = enc.gather_positions(hidden, masked.positions)
    return self.head_module.apply({"params": params["mlm_head"]}, selected,
                                  enc.word_embedding_table(params["encoder"]))

  def loss(self, params, state, batch, rng, *, train):
    mask_rng, dropout_rng = jax.random.split(rng)
    masked = self.mask(mask_rng, batch["input_ids"])
    logits = self.predict(params, masked, batch, dropout_rng, train)
    loss, metrics = mlm_loss_and_metrics(logits, masked.targets, masked.weights)
    return loss, (metrics, state)

  def encoder(self, params):
    return params["encoder"]
