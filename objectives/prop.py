"""PROP (Ma et al. 2021): representative words prediction, for ad-hoc retrieval pretraining.

Per row (the document d: its tokens other than the special ones), on device:
- the document's unigram language model with Dirichlet smoothing,
  P(w | d) = (tf(w, d) + mu P(w | C)) / (|d| + mu), where P(w | C) is the background model: the
  tokenizer's unigram log-probabilities when it has them (a sentencepiece unigram model), else
  uniform over the ordinary tokens;
- a set length l ~ Poisson(`prop_lambda`), clipped to [1, `prop_max_set`], and two word sets of
  l words each, drawn from P(w | d) without replacement (Gumbel top-k);
- each set's likelihood, the sum of log P(w | d) over its words: the likelier set is the more
  representative one.
The encoder reads "[CLS] set [SEP] document" (the row's tokens after its [CLS], cut to fit) and a
dense layer on the final [CLS] state scores it; the loss is the pairwise hinge
max(0, 1 - (score(likelier) - score(other))). PROP trains this jointly with MLM: use
`objective.name=combined, components="mlm:1.0,prop:1.0"` (configs/prop.py), one shared encoder.

Ours vs the paper: the paper's background model counts the whole corpus and its documents are
whole passages; here P(w | C) is the tokenizer's (trained on the same corpus) and a document is one
packed row of `data.seq_len` tokens (several short documents may share a row). The paper's set
sampling is over words; ours is over the tokenizer's pieces.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from objectives import base, checks
from pretrain.models import encoder as enc, layers

CONFIG = dict(
    prop_mu=100.0,      # Dirichlet smoothing of the document language model
    prop_lambda=3.0,    # Poisson mean of the word-set length
    prop_max_set=8,     # longest word set (slots in the input row)
)


def validate_config(config):
  o = config.objective
  checks.require(o.prop_mu > 0, "objective.prop_mu", o.prop_mu, "> 0")
  checks.require(o.prop_lambda > 0, "objective.prop_lambda", o.prop_lambda, "> 0")
  checks.require(1 <= o.prop_max_set <= config.data.seq_len // 2, "objective.prop_max_set",
                 o.prop_max_set, f"1..{config.data.seq_len // 2} (half of data.seq_len)")


def background_log_probs(tokenizer, vocab_size: int, ordinary_V) -> np.ndarray:
  """log P(w | C) [V]: the tokenizer's unigram log-probabilities, else uniform; renormalised over
  the ordinary ids (special ids get -inf: never sampled)."""
  scores = np.zeros(vocab_size)
  proto = getattr(tokenizer, "proto", None)
  if proto is not None and getattr(tokenizer, "model_type", "") == "unigram":
    pieces = proto().pieces
    if len(pieces) == vocab_size:
      # Only NORMAL pieces (type 1) carry a log-probability; byte-fallback and user-defined
      # pieces score 0, so they get the rarest normal piece's score.
      normal = np.asarray([p.type == 1 for p in pieces])
      scores = np.asarray([p.score for p in pieces], np.float64)
      scores[~normal] = scores[normal].min() if normal.any() else 0.0
  logp = np.full(vocab_size, -np.inf)
  ordinary = scores[ordinary_V]
  top = ordinary.max()
  logp[ordinary_V] = ordinary - (top + np.log(np.sum(np.exp(ordinary - top))))
  return logp.astype(np.float32)


def document_log_probs(ids_BL, doc_BL, background_V, mu):
  """log P(w | d) [B, V] of each row's document tokens (`doc_BL` marks them), Dirichlet-smoothed."""
  b, v = ids_BL.shape[0], background_V.shape[0]
  tf = jnp.zeros((b, v)).at[jnp.arange(b)[:, None], ids_BL].add(doc_BL.astype(jnp.float32))
  length = jnp.sum(doc_BL, 1, keepdims=True).astype(jnp.float32)
  p = (tf + mu * jnp.exp(background_V)[None]) / (length + mu)
  return jnp.where(jnp.isfinite(background_V)[None], jnp.log(jnp.maximum(p, 1e-30)), -jnp.inf)


def sample_sets(rng, logp_BV, lam, max_set):
  """(ids [2, B, S], slot mask [B, S], likelihoods [2, B]): two sets of l ~ Poisson words each."""
  len_rng, *set_rngs = jax.random.split(rng, 3)
  b = logp_BV.shape[0]
  length = jnp.clip(jax.random.poisson(len_rng, lam, (b,)), 1, max_set)
  slots = jnp.arange(max_set)[None, :] < length[:, None]
  ids, likelihood = [], []
  for r in set_rngs:
    noisy = logp_BV + jax.random.gumbel(r, logp_BV.shape)
    _, chosen = jax.lax.top_k(noisy, max_set)  # The first l of a Gumbel top-k: no replacement.
    ids.append(chosen.astype(jnp.int32))
    likelihood.append(jnp.sum(jnp.take_along_axis(logp_BV, chosen, 1) * slots, 1))
  return jnp.stack(ids), slots, jnp.stack(likelihood)


def set_rows(set_BS, slots_BS, ids_BL, doc_BL, cls_id, sep_id):
  """"[CLS] set [SEP] document" rows of the batch's length: ids, segment ids, positions."""
  b, s = set_BS.shape
  length = ids_BL.shape[1] - s - 2
  doc_ids, doc_mask = ids_BL[:, 1:1 + length], doc_BL[:, 1:1 + length]
  col = lambda v: jnp.full((b, 1), v, jnp.int32)  # noqa: E731
  ids = jnp.concatenate([col(cls_id), set_BS, col(sep_id), doc_ids], 1)
  real = jnp.concatenate([col(1), slots_BS.astype(jnp.int32), col(1),
                          (doc_mask | (doc_ids == sep_id)).astype(jnp.int32)], 1)
  positions = jnp.maximum(jnp.cumsum(real, 1) - 1, 0) * real
  return {"input_ids": jnp.where(real > 0, ids, 0), "segment_ids": real,
          "positions": positions.astype(jnp.int32)}


class PropHead(nn.Module):
  """dense(1) on the final [CLS] state: the (word set, document) score."""

  config: enc.EncoderConfig

  @nn.compact
  def __call__(self, cls_BH):
    # The output axis has size 1, so it stays unnamed (replicated).
    return layers.dense(self.config, 1, ("embed", None), "score")(cls_BH)[:, 0].astype(jnp.float32)


class Prop(base.EncoderObjective):
  """Representative words prediction over the shared encoder: params {"encoder", "prop_head"}."""

  checks = (*base.EncoderObjective.checks, validate_config)

  def __init__(self, config, model_config: enc.EncoderConfig, tokenizer, resources=base.Resources()):
    super().__init__(config, model_config, tokenizer, resources)
    ordinary = np.ones(model_config.vocab_size, bool)
    ordinary[list(self.special_ids.non_candidates)] = False
    ordinary[:self.special_ids.first_ordinary] = False
    self.background = background_log_probs(tokenizer, model_config.vocab_size, ordinary)
    self.head_module = PropHead(model_config)

  def init(self, rng, batch):
    enc_rng, head_rng = jax.random.split(rng)
    hidden = jnp.zeros((1, self.model_config.hidden_size))
    return {"encoder": self.init_encoder(enc_rng, batch),
            "prop_head": self.head_module.init(head_rng, hidden)["params"]}

  def loss(self, params, state, batch, rng, *, train):
    c, ids = self.config, batch["input_ids"]
    sample_rng, dropout_rng = jax.random.split(rng)
    doc = (batch["segment_ids"] > 0) & ~jnp.isin(ids, jnp.asarray(self.special_ids.non_candidates))
    logp = document_log_probs(ids, doc, jnp.asarray(self.background), c.prop_mu)
    sets, slots, likelihood = sample_sets(sample_rng, logp, c.prop_lambda, c.prop_max_set)
    rows = [set_rows(sets[i], slots, ids, doc, self.special_ids.cls, self.special_ids.sep)
            for i in range(2)]
    both = {k: jnp.concatenate([r[k] for r in rows]) for k in rows[0]}
    hidden = self.encoder_module.apply(
        {"params": params["encoder"]}, both["input_ids"], both["segment_ids"], both["positions"],
        deterministic=not train, rngs={"dropout": dropout_rng})
    score = self.head_module.apply({"params": params["prop_head"]}, hidden[:, 0]).reshape(2, -1)
    first_likelier = likelihood[0] >= likelihood[1]
    margin = jnp.where(first_likelier, score[0] - score[1], score[1] - score[0])
    hinge = jnp.maximum(0.0, 1.0 - margin)
    # Rows without document tokens, or whose two sets are equally likely, teach no preference.
    weights = ((jnp.sum(doc, 1) > 0) & (likelihood[0] != likelihood[1])).astype(jnp.float32)
    loss = jnp.sum(hinge * weights) / jnp.maximum(weights.sum(), 1.0)
    return loss, ({"prop_loss": base.mean_metric(hinge, weights),
                   "prop_accuracy": base.mean_metric(margin > 0, weights)}, state)
