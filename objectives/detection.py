"""Replaced-token detection without a generator (RTS, C-RTS), swapped LM (SLM), and the detector.

The detector is ELECTRA's discriminator: the shared encoder plus a per-token head dense(H) -> GELU
-> dense(1) (HF ``ElectraDiscriminatorPredictions`` names), trained with sigmoid cross-entropy over
every non-padding token ([CLS] and [SEP] included, as in the official ELECTRA code).
`objectives.electra` builds on it; the generator-free relatives here replace the selected tokens
themselves (Di Liello et al., "Effective pre-training objectives for transformer-based
autoencoders", 2022):

- RTS: the selected 15% become uniformly random ordinary ids; loss = discriminator_weight * BCE.
- C-RTS: the replacement of a token of cluster a is drawn from cluster b with probability
  softmax(cluster_logit_scale * minmax(counts[a]))[b], then uniformly inside b. `counts[a, b]` (the
  objective's non-gradient state, checkpointed with the train state) counts the replaced tokens of
  cluster a -> b that the detector took for originals, so replacements it confuses are drawn more.
- SLM: masked LM in which every selected token is replaced by a random one and the original is
  predicted, i.e. `mlm.MaskedLM` with mask_token_rate=0, random_token_rate=1.

A random replacement equal to the original (chance about 1/V) is labelled "real", as in ELECTRA.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from objectives import base, checks, masking, mlm
from pretrain.models import encoder as enc
from pretrain.models import layers

CONFIG = dict(
    discriminator_weight=50.0,  # electra, rts, crts: weight of the replaced-token BCE
    num_clusters=100,           # crts: the vocabulary's id buckets
    cluster_logit_scale=2.0,    # crts: replacement cluster ~ softmax(scale * minmax(counts))
)


def validate_config(config):
  o = config.objective
  checks.require(o.discriminator_weight >= 0, "objective.discriminator_weight",
                 o.discriminator_weight, ">= 0")
  ordinary_ids = config.data.tokenizer.vocab_size - 5
  checks.require(o.name != "crts" or 1 <= o.num_clusters <= ordinary_ids, "objective.num_clusters",
                 o.num_clusters, f"1 <= n <= data.tokenizer.vocab_size - 5 = {ordinary_ids}")
  checks.require(o.cluster_logit_scale >= 0, "objective.cluster_logit_scale",
                 o.cluster_logit_scale, ">= 0")


class DiscriminatorHead(nn.Module):
  """dense(H) -> GELU (exact, HF "gelu") -> dense(1): one float32 replaced-logit per token."""

  config: enc.EncoderConfig

  @nn.compact
  def __call__(self, hidden_BLH):
    cfg = self.config
    dense = enc._dense  # pylint: disable=protected-access  # The encoder's annotated Dense.
    x_BLH = dense(cfg, cfg.hidden_size, ("embed", "mlp"), "dense")(hidden_BLH)
    x_BLH = layers.gelu(x_BLH)
    # The output axis has size 1, so it stays unnamed (replicated); the input is named "mlp".
    logits_BL1 = dense(cfg, 1, ("mlp", None), "dense_prediction")(x_BLH)
    return logits_BL1[..., 0].astype(jnp.float32)


def detection_loss_and_metrics(logits_BL, replaced_BL, weights_BL):
  """Mean sigmoid cross-entropy over weighted tokens; accuracy, precision, recall of "replaced";
  the mean predicted probability of "replaced" on replaced and on original tokens.

  Early in training a detector can rank replaced tokens above originals (its loss falls below
  the prior's, H(replaced_fraction)) long before any probability crosses 0.5: precision and
  recall at that threshold stay 0 then, and the two mean probabilities show the separation.
  """
  logits = logits_BL.astype(jnp.float32)
  weights = weights_BL.astype(jnp.float32)
  bce = optax.sigmoid_binary_cross_entropy(logits, replaced_BL.astype(jnp.float32))
  loss = jnp.sum(bce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  predicted = logits > 0
  return loss, {
      "disc_loss": base.mean_metric(bce, weights),
      "disc_accuracy": base.mean_metric(predicted == replaced_BL, weights),
      "disc_precision": base.mean_metric(replaced_BL, weights * predicted),
      "disc_recall": base.mean_metric(predicted, weights * replaced_BL),
      "replaced_fraction": base.mean_metric(replaced_BL, weights),
      "disc_prob_replaced": base.mean_metric(jax.nn.sigmoid(logits), weights * replaced_BL),
      "disc_prob_original": base.mean_metric(jax.nn.sigmoid(logits), weights * ~replaced_BL),
  }


class Detector(base.EncoderObjective):
  """The shared encoder + `DiscriminatorHead`; params {"encoder", "discriminator_head"}."""

  checks = (masking.validate_config, validate_config)
  export_format = "electra"

  def __init__(self, config, model_config: enc.EncoderConfig, tokenizer, resources=base.Resources()):
    super().__init__(config, model_config, tokenizer, resources)
    self.head_module = DiscriminatorHead(model_config)

  def init(self, rng, batch):
    enc_rng, head_rng = jax.random.split(rng)
    encoder = self.init_encoder(enc_rng, batch)
    hidden = jnp.zeros((batch["input_ids"].shape[0], 1, self.model_config.hidden_size))
    head = self.head_module.init(head_rng, hidden)["params"]
    return {"encoder": encoder, "discriminator_head": head}

  def detect(self, params, input_ids_BL, batch, rng, train):
    """[B, L] float32 logits that each token was replaced."""
    hidden = self.encode(params, input_ids_BL, batch, rng, train)
    return self.head_module.apply({"params": params["discriminator_head"]}, hidden)


class RandomTokenSubstitution(Detector):
  """RTS: detect the selected tokens after replacing them with uniformly random ordinary ids.

  objective.mask_token_rate / random_token_rate are not read: every selected token is replaced.
  """

  def replace(self, rng, input_ids_BL, selected_BL, state):
    del state
    return masking.corrupt(rng, input_ids_BL, selected_BL, self.model_config.vocab_size, 0.0, 1.0,
                           ids=self.special_ids)

  def update_state(self, state, input_ids_BL, corrupted_BL, logits_BL, weights_BL):
    del input_ids_BL, corrupted_BL, logits_BL, weights_BL
    return state

  def loss(self, params, state, batch, rng, *, train):
    select_rng, replace_rng, dropout_rng = jax.random.split(rng, 3)
    ids = batch["input_ids"]
    # The same selection as MLM: round(mask_rate * #candidates) tokens, words or spans per row.
    selected = masking.select_with_config(select_rng, ids, self.config, self.word_start_table,
                                          self.special_ids)
    corrupted = self.replace(replace_rng, ids, selected, state)
    logits = self.detect(params, corrupted, batch, dropout_rng, train)
    weights = batch["segment_ids"] > 0
    disc_loss, metrics = detection_loss_and_metrics(logits, corrupted != ids, weights)
    loss = self.config.discriminator_weight * disc_loss
    metrics["total_loss"] = base.mean_metric(loss, jnp.ones(()))
    # Evaluation never adapts the sampler: eval_step discards the state, and so do we.
    new_state = self.update_state(state, ids, corrupted, logits, weights) if train else state
    return loss, (metrics, new_state)


def id_clusters(vocab_size, num_clusters, first_ordinary=masking.FIRST_ORDINARY_ID):
  """(cluster of each id [V], first id of each cluster [K + 1]) as numpy int32.

  The ordinary ids [first_ordinary, V) are cut into `num_clusters` contiguous buckets of
  (nearly) equal size; special ids join cluster 0 but are never selected. Our choice: id buckets,
  because sentencepiece orders ids by piece score (unigram) or merge order (BPE), so buckets are
  roughly frequency bands, and no corpus statistics are needed.
  """
  first, n = first_ordinary, vocab_size - first_ordinary
  if not 1 <= num_clusters <= n:
    raise ValueError(f"objective.num_clusters={num_clusters} must be in [1, {n}] (the number of "
                     f"ordinary ids of a {vocab_size}-id vocabulary).")
  starts = first + -(-np.arange(num_clusters + 1) * n // num_clusters)  # ceil(b * n / K)
  cluster = np.zeros(vocab_size, np.int32)
  cluster[first:] = (np.arange(n) * num_clusters) // n
  return cluster, starts.astype(np.int32)


def cluster_logits(counts_KK, scale):
  """scale * minmax of each row of counts (rows with no spread give uniform logits 0)."""
  counts = counts_KK.astype(jnp.float32)
  low, high = counts.min(-1, keepdims=True), counts.max(-1, keepdims=True)
  return scale * (counts - low) / jnp.where(high > low, high - low, 1.0)


class ClusterRandomTokenSubstitution(RandomTokenSubstitution):
  """C-RTS: RTS whose replacements come from the clusters the detector confuses most.

  State {"confusion_counts": int32 [K, K]}: counts[a, b] += the replaced tokens of cluster a whose
  replacement came from cluster b and that the detector scored as original (logit <= 0). We count
  only these misses, from training steps only, with no decay, and normalise each row separately.
  """

  def __init__(self, config, model_config, tokenizer, resources=base.Resources()):
    super().__init__(config, model_config, tokenizer, resources)
    self.cluster_V, self.starts_K1 = id_clusters(model_config.vocab_size, config.num_clusters,
                                                 self.special_ids.first_ordinary)
    self.num_clusters = config.num_clusters

  def init_state(self):
    return {"confusion_counts": jnp.zeros((self.num_clusters, self.num_clusters), jnp.int32)}

  def replace(self, rng, input_ids_BL, selected_BL, state):
    cluster_rng, id_rng = jax.random.split(rng)
    logits_KK = cluster_logits(state["confusion_counts"], self.config.cluster_logit_scale)
    source_BL = jnp.asarray(self.cluster_V)[input_ids_BL]
    target_BL = jax.random.categorical(cluster_rng, logits_KK[source_BL])
    starts = jnp.asarray(self.starts_K1)
    low, size = starts[target_BL], starts[target_BL + 1] - starts[target_BL]
    offset = jnp.floor(jax.random.uniform(id_rng, input_ids_BL.shape) * size).astype(jnp.int32)
    new_ids = low + jnp.minimum(offset, size - 1)
    return jnp.where(selected_BL, new_ids, input_ids_BL).astype(input_ids_BL.dtype)

  def update_state(self, state, input_ids_BL, corrupted_BL, logits_BL, weights_BL):
    k = self.num_clusters
    cluster = jnp.asarray(self.cluster_V)
    missed = (corrupted_BL != input_ids_BL) & (logits_BL <= 0) & weights_BL
    pair = cluster[input_ids_BL] * k + cluster[corrupted_BL]
    new = jax.ops.segment_sum(missed.astype(jnp.int32).ravel(), pair.ravel(), num_segments=k * k)
    return {"confusion_counts": state["confusion_counts"] + new.reshape(k, k)}


class SwappedLM(mlm.MaskedLM):
  """SLM: masked LM whose selected tokens all become random ordinary ids; predicts the originals.

  objective.mask_token_rate / random_token_rate are not read: they are 0 and 1 by definition.
  """

  def mask(self, rng, input_ids):
    return masking.mask_with_config(rng, input_ids, self.config, self.model_config.vocab_size,
                                    self.word_start_table, self.special_ids,
                                    mask_token_rate=0.0, random_token_rate=1.0)
