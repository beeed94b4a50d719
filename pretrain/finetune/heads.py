"""Fine-tuning heads over the pretrained `Encoder`, and the task models that pair them.

A task model has the shape of a pretraining objective (`objectives/base.py`: `init`,
`init_state`, `loss -> (loss, (metrics, state))`, `encoder`, `example_batch`) so that
`pretrain.training`'s sharded init, train step and checkpointing run it unchanged; `predict` gives
what evaluation scores on the host (logits or embeddings). Parameters: {"encoder", "head"}.

Inputs are single unpacked rows: [CLS] a [SEP] (b [SEP]) then padding, with segment_ids 1 on
tokens and 0 on padding (our encoder's attention mask), positions 0..n-1 and token_types 0 for
the first text, 1 for the second. The encoder adds token-type row 0 to every token itself, so a
second type is passed as word embedding + (type_t - type_0) through `input_embeds_BLH`: the sum is
HF BERT's word + type_t, and gradients still reach the word table.

Heads:
  sequence   pooled ([CLS], mean or max) -> dense -> tanh -> dropout -> dense(classes): one label per
             row, for single texts and text pairs (RoBERTa's classification head);
  token      dropout -> dense(classes) on every token; labels -1 are ignored (padding, non-first
             word pieces);
  locate     a pointer (Vasic et al. 2019, CuBERT's localisation): dropout -> dense(1) on every
             token, softmax over the row's positions (padding masked out); the label is one
             position, 0 ([CLS]) for "no bug";
  biencoder  query and document encoded separately by the shared encoder, pooled, L2-normalised;
             in-batch softmax over cosine / temperature (every other row's document is a
             negative). No parameters of its own.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from objectives import base
from pretrain.models import encoder as enc, pooling as pooling_lib

ROW_FEATURES = ("input_ids", "segment_ids", "positions", "token_types")


def _dense(features, axes, name, dtype):
  return nn.Dense(features, dtype=jnp.dtype(dtype),
                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
                  name=name)


class SequenceHead(nn.Module):
  """dense(H) -> tanh -> dropout -> dense(num_classes) on a pooled [B, H] vector."""
  num_classes: int
  dropout_rate: float
  dtype: str = "float32"

  @nn.compact
  def __call__(self, pooled_BH, *, deterministic: bool):
    x_BH = _dense(pooled_BH.shape[-1], ("embed", "mlp"), "dense", self.dtype)(pooled_BH)
    x_BH = nn.Dropout(self.dropout_rate)(jnp.tanh(x_BH), deterministic=deterministic)
    return _dense(self.num_classes, ("mlp", None), "out", self.dtype)(x_BH).astype(jnp.float32)


class TokenHead(nn.Module):
  """dropout -> dense(num_classes) on every [B, L, H] state."""
  num_classes: int
  dropout_rate: float
  dtype: str = "float32"

  @nn.compact
  def __call__(self, hidden_BLH, *, deterministic: bool):
    x_BLH = nn.Dropout(self.dropout_rate)(hidden_BLH, deterministic=deterministic)
    return _dense(self.num_classes, ("embed", None), "out", self.dtype)(x_BLH).astype(jnp.float32)


class PointerHead(nn.Module):
  """dropout -> dense(1) on every [B, L, H] state: one [B, L] score per position."""
  dropout_rate: float
  dtype: str = "float32"

  @nn.compact
  def __call__(self, hidden_BLH, *, deterministic: bool):
    x_BLH = nn.Dropout(self.dropout_rate)(hidden_BLH, deterministic=deterministic)
    return _dense(1, ("embed", None), "out", self.dtype)(x_BLH)[..., 0].astype(jnp.float32)


# Padding's score: far below any real one, yet finite, so softmax and its gradient stay finite.
MASKED_LOGIT = -1e9


def mask_positions(logits_BL, segment_ids_BL):
  """Scores with padding (segment 0) at MASKED_LOGIT: zero probability under a softmax."""
  return jnp.where(segment_ids_BL > 0, logits_BL, MASKED_LOGIT)


def pointer_loss(logits_BL, labels_B, weights_B):
  """(weighted mean cross-entropy of the label positions, metrics) of masked [B, L] scores."""
  weights_B = weights_B.astype(jnp.float32)
  ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BL, labels_B)
  loss = jnp.sum(ce_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)
  correct_B = jnp.argmax(logits_BL, -1) == labels_B
  return loss, {"loss": base.mean_metric(ce_B, weights_B),
                "accuracy": base.mean_metric(correct_B, weights_B)}


def encode(model_config, encoder_params, rows, rng, train, use_token_types):
  """[B, L, H] hidden states of rows {input_ids, segment_ids, positions, token_types}."""
  embeds = None
  if use_token_types and model_config.type_vocab_size > 1:
    emb = encoder_params["embeddings"]
    types_TE = emb["token_type_embeddings"]["embedding"]
    word_BLE = jnp.take(emb["word_embeddings"]["embedding"], rows["input_ids"], axis=0)
    embeds = word_BLE + jnp.take(types_TE, rows["token_types"], axis=0) - types_TE[0]
  return enc.Encoder(model_config).apply(
      {"params": encoder_params}, rows["input_ids"], rows["segment_ids"], rows["positions"],
      deterministic=not train, input_embeds_BLH=embeds, rngs={"dropout": rng})


def _rows(batch, prefix=""):
  return {k: batch[prefix + k] for k in ROW_FEATURES}


class _TaskModel:
  """Shared plumbing: the encoder, its init, the token-type switch."""

  features = ROW_FEATURES

  def __init__(self, model_config: enc.EncoderConfig, *, num_classes: int = 2,
               pooling: str = "cls", use_token_types: bool = True, temperature: float = 0.05):
    self.model_config, self.num_classes = model_config, num_classes
    self.pooling = pooling_lib.check(pooling)
    self.use_token_types, self.temperature = use_token_types, temperature
    self.encoder_module = enc.Encoder(model_config)

  def init_state(self):
    return {}

  def encoder(self, params):
    return params["encoder"]

  def example_batch(self, seq_len):
    row = jnp.ones((1, seq_len), jnp.int32)
    return {**{f: row for f in self.features}, "labels": jnp.zeros(self.label_shape(seq_len),
                                                                    jnp.int32),
            "weights": jnp.ones((1,), jnp.float32)}

  def label_shape(self, seq_len):
    return (1,)

  def init_encoder(self, rng, batch, prefix=""):
    return self.encoder_module.init(rng, batch[prefix + "input_ids"], batch[prefix + "segment_ids"],
                                    batch[prefix + "positions"])["params"]

  def hidden(self, params, batch, rng, train, prefix=""):
    return encode(self.model_config, params["encoder"], _rows(batch, prefix), rng, train,
                  self.use_token_types)


class SequenceClassifier(_TaskModel):
  """One label per row (single text or text pair)."""

  def __init__(self, model_config, **kwargs):
    super().__init__(model_config, **kwargs)
    self.head_module = SequenceHead(self.num_classes, model_config.dropout_rate,
                                    model_config.dtype)

  def init(self, rng, batch):
    enc_rng, head_rng = jax.random.split(rng)
    pooled = jnp.zeros((1, self.model_config.hidden_size))
    return {"encoder": self.init_encoder(enc_rng, batch),
            "head": self.head_module.init(head_rng, pooled, deterministic=True)["params"]}

  def predict(self, params, batch, rng=None, train=False):
    """float32 logits [B, num_classes]."""
    rng = jax.random.key(0) if rng is None else rng
    enc_rng, head_rng = jax.random.split(rng)
    hidden_BLH = self.hidden(params, batch, enc_rng, train)
    pooled_BH = pooling_lib.pool(hidden_BLH, batch["segment_ids"], self.pooling)
    return self.head_module.apply({"params": params["head"]}, pooled_BH, deterministic=not train,
                                  rngs={"dropout": head_rng})

  def loss(self, params, state, batch, rng, *, train):
    logits_BC = self.predict(params, batch, rng, train)
    weights_B = batch["weights"].astype(jnp.float32)
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BC, batch["labels"])
    loss = jnp.sum(ce_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)
    correct_B = jnp.argmax(logits_BC, -1) == batch["labels"]
    return loss, ({"loss": base.mean_metric(ce_B, weights_B),
                   "accuracy": base.mean_metric(correct_B, weights_B)}, state)


class TokenClassifier(_TaskModel):
  """One label per token; labels -1 (padding, continuation pieces) are not scored."""

  def __init__(self, model_config, **kwargs):
    super().__init__(model_config, **kwargs)
    self.head_module = TokenHead(self.num_classes, model_config.dropout_rate, model_config.dtype)

  def label_shape(self, seq_len):
    return (1, seq_len)

  def init(self, rng, batch):
    enc_rng, head_rng = jax.random.split(rng)
    hidden = jnp.zeros((1, 1, self.model_config.hidden_size))
    return {"encoder": self.init_encoder(enc_rng, batch),
            "head": self.head_module.init(head_rng, hidden, deterministic=True)["params"]}

  def predict(self, params, batch, rng=None, train=False):
    """float32 logits [B, L, num_classes]."""
    rng = jax.random.key(0) if rng is None else rng
    enc_rng, head_rng = jax.random.split(rng)
    hidden_BLH = self.hidden(params, batch, enc_rng, train)
    return self.head_module.apply({"params": params["head"]}, hidden_BLH, deterministic=not train,
                                  rngs={"dropout": head_rng})

  def loss(self, params, state, batch, rng, *, train):
    logits_BLC = self.predict(params, batch, rng, train)
    labels_BL = batch["labels"]
    weights_BL = (labels_BL >= 0) * batch["weights"][:, None]
    safe_BL = jnp.maximum(labels_BL, 0)
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLC, safe_BL)
    loss = jnp.sum(ce_BL * weights_BL) / jnp.maximum(jnp.sum(weights_BL), 1.0)
    correct_BL = jnp.argmax(logits_BLC, -1) == safe_BL
    return loss, ({"loss": base.mean_metric(ce_BL, weights_BL),
                   "accuracy": base.mean_metric(correct_BL, weights_BL)}, state)


class BugLocator(TokenClassifier):
  """A pointer over the row's positions: the label is the first token of the bug, 0 for none.
  The token classifier's plumbing with one score per position and a single label per row."""

  def __init__(self, model_config, **kwargs):
    super().__init__(model_config, **kwargs)
    self.head_module = PointerHead(model_config.dropout_rate, model_config.dtype)

  def label_shape(self, seq_len):
    return (1,)

  def predict(self, params, batch, rng=None, train=False):
    """float32 scores [B, L], padding at MASKED_LOGIT."""
    return mask_positions(super().predict(params, batch, rng, train), batch["segment_ids"])

  def loss(self, params, state, batch, rng, *, train):
    loss, metrics = pointer_loss(self.predict(params, batch, rng, train), batch["labels"],
                                 batch["weights"])
    return loss, (metrics, state)


class BiEncoder(_TaskModel):
  """Query and document towers sharing one encoder; in-batch softmax over cosine similarity."""

  features = tuple(p + f for p in ("query_", "doc_") for f in ROW_FEATURES)

  def example_batch(self, seq_len):
    row = jnp.ones((1, seq_len), jnp.int32)
    return {**{f: row for f in self.features}, "weights": jnp.ones((1,), jnp.float32)}

  def init(self, rng, batch):
    return {"encoder": self.init_encoder(rng, batch, "query_"), "head": {}}

  def embed(self, params, batch, prefix, rng=None, train=False):
    """L2-normalised float32 [B, H] embeddings of the rows under `prefix` ("query_", "doc_")."""
    rng = jax.random.key(0) if rng is None else rng
    hidden_BLH = self.hidden(params, batch, rng, train, prefix)
    pooled_BH = pooling_lib.pool(hidden_BLH, batch[prefix + "segment_ids"], self.pooling)
    return pooling_lib.l2_normalize(pooled_BH.astype(jnp.float32), eps=1e-9)

  def predict(self, params, batch, rng=None, train=False):
    return self.embed(params, batch, "query_"), self.embed(params, batch, "doc_")

  def loss(self, params, state, batch, rng, *, train):
    q_rng, d_rng = jax.random.split(rng)
    q_BH = self.embed(params, batch, "query_", q_rng, train)
    d_BH = self.embed(params, batch, "doc_", d_rng, train)
    weights_B = batch["weights"].astype(jnp.float32)
    logits_BB = (q_BH @ d_BH.T) / self.temperature
    logits_BB = jnp.where(weights_B[None, :] > 0, logits_BB, -1e9)  # Padding rows are no docs.
    targets_B = jnp.arange(q_BH.shape[0])
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BB, targets_B)
    loss = jnp.sum(ce_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)
    correct_B = jnp.argmax(logits_BB, -1) == targets_B
    return loss, ({"loss": base.mean_metric(ce_B, weights_B),
                   "in_batch_accuracy": base.mean_metric(correct_B, weights_B)}, state)


TASK_MODELS = {"sequence": SequenceClassifier, "token": TokenClassifier, "biencoder": BiEncoder,
               "locate": BugLocator}


def make(head: str, model_config: enc.EncoderConfig, **kwargs):
  """The task model for `head` (a key of TASK_MODELS); an unknown name lists the valid ones."""
  if head not in TASK_MODELS:
    raise ValueError(f"Unknown head {head!r}; allowed: {', '.join(TASK_MODELS)}.")
  return TASK_MODELS[head](model_config, **kwargs)
