"""ERNIE-Gram (Xiao et al., NAACL 2021): explicitly n-gram masked language modelling.

The authors released no pretraining code, so everything below the paper's level of description is
our choice; each is marked "ours".

1. Lexicon and units. `pretrain.data.ngrams` extracts a t-test n-gram lexicon (2 <= n <=
   ngram_max_n) from the train split once, saves it beside the tokenizer, and marks each packed
   row by forward maximum matching on the host (features "ngram_len", "ngram_ids"; ours: host
   matching, see that module). A unit is a matched n-gram or a single ordinary token.
2. Selection. Whole units in random order while round(mask_rate * #ordinary tokens) tokens last,
   the whole-word rule of `masking.select` with units for words (ours: the paper samples n-gram
   lengths; here the lexicon's segmentation decides them).
3. Explicit n-gram MLM. A selected n-gram collapses to ONE [MASK]; a selected single token gets
   BERT's 80/10/10 (ours: an n-gram always becomes [MASK]). Collapsing deletes the n-gram's other
   tokens and compacts the row on device (a cumsum gives each kept token its new index; the row
   keeps its length L and ends in padding), so shapes stay static. Position ids are NOT compacted
   (ours): the [MASK] keeps its first token's position and every other token its own, so the
   fine-grained slots below can carry their tokens' true positions; the price is that the
   position gap after a collapsed [MASK] tells the model n. Each selected unit is predicted as one
   id of the joint vocabulary: tokens 0..V-1, then n-grams V..V+G-1 (G = ngram_vocab_size; the
   head is the tied MLM head over [word embeddings; n-gram embeddings] with a V+G bias). The
   n-gram embedding table is pretraining-only and not exported.
4. Comprehensive n-gram prediction (ngram_comprehensive). For every token of a selected n-gram, a
   fine-grained [MASK] slot is appended after the L row slots (static: M = max_predictions slots),
   with the token's segment and position. An explicit attention mask (`comprehensive_mask`): row
   tokens see their own segment's row tokens only (so the coarse prediction is unchanged by the
   appended slots); a fine slot sees its segment's row tokens (context and the collapsed [MASK])
   and itself, never another fine slot, so the fine predictions of one n-gram cannot see each
   other (the paper's mask). Fine slots predict tokens (the first V rows of the joint head). Loss =
   mean coarse cross-entropy + mean fine cross-entropy (ours: equal weights).
5. Enhanced relation modelling (ngram_relation). A generator (ELECTRA's: hidden x
   generator_size_fraction, same depth, sharing the token and n-gram embeddings) predicts the
   joint id of every selected unit from the collapsed row; a Gumbel-max sample (stop-gradient) is
   written into each collapsed slot, so the main model reads plausible n-grams or tokens there
   (input embeddings from the joint table) and must recover the originals (coarse, and fine with
   4.). A detector head (ELECTRA's) marks which row slots hold a replacement (a sample equal to
   the original counts as real). Loss = generator_weight x generator CE + coarse + fine +
   discriminator_weight x BCE over the non-padding row slots (the ELECTRA keys and defaults).

Evaluation also reports `mlm_loss` / `mlm_accuracy`: plain token MLM (the config's masking, same
masks as objective `mlm` with the same evaluation rng) through the token rows of the joint head,
so an ERNIE-Gram run and an MLM run are compared on the same task.
"""
import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from objectives import base, checks, detection, electra, masking, mlm
from pretrain.data import ngrams, tokenizer as tok
from pretrain.models import encoder as enc

CONFIG = dict(
    ngram_vocab_size=8000,      # ernie_gram: n-gram rows of the joint vocabulary (lexicon size)
    ngram_max_n=3,              # ernie_gram: longest lexicon n-gram
    ngram_min_count=5,          # ernie_gram: lexicon n-grams occur at least this often
    ngram_score="t_test",       # ernie_gram: lexicon ranking, t_test (the paper's) or pmi
    ngram_max_train_bytes=0,    # ernie_gram: text read for the lexicon; 0: tokenizer's cap
    ngram_comprehensive=True,   # ernie_gram: also predict each n-gram's tokens (fine-grained)
    ngram_relation=False,       # ernie_gram: enhanced relation modelling (generator + detection)
)


def validate_config(config):
  o = config.objective
  checks.require(o.ngram_vocab_size >= 1, "objective.ngram_vocab_size", o.ngram_vocab_size, ">= 1")
  vocab = config.data.tokenizer.vocab_size
  checks.require(2 <= o.ngram_max_n and vocab ** o.ngram_max_n < 2 ** 63, "objective.ngram_max_n",
                 o.ngram_max_n, ">= 2 with data.tokenizer.vocab_size ** n < 2 ** 63 (int64 keys)")
  checks.require(o.ngram_min_count >= 1, "objective.ngram_min_count", o.ngram_min_count, ">= 1")
  checks.require(o.ngram_score in ngrams.SCORES, "objective.ngram_score", o.ngram_score,
                 ", ".join(ngrams.SCORES))
  checks.require(o.ngram_max_train_bytes >= 0, "objective.ngram_max_train_bytes",
                 o.ngram_max_train_bytes, ">= 0 (0: data.tokenizer.max_train_bytes)")


def _scatter_rows(size, index_BN, values_BN, fill):
  """[B, size] of `fill` with values_BN written at index_BN (index >= size is dropped)."""
  rows = jnp.arange(index_BN.shape[0])[:, None]
  out = jnp.full((index_BN.shape[0], size + 1), fill, values_BN.dtype)
  return out.at[rows, jnp.minimum(index_BN, size)].set(values_BN)[:, :size]


class Units(NamedTuple):
  """The selected units of a batch, on the original rows ([B, L] bool each)."""
  selected: jax.Array  # every token of a selected unit
  start: jax.Array     # the first token of a selected unit
  ngram: jax.Array     # every token of a selected n-gram (n >= 2)


def select_units(rng, batch, rate, slots, ids=masking.SENTENCEPIECE):
  """Whole units (lexicon n-grams or single tokens) while round(rate * #candidates) tokens last."""
  ids_BL, len_BL = batch["input_ids"], batch["ngram_len"]
  cand_BL = masking.candidates(ids_BL, ids)
  unit_start_BL = cand_BL & (len_BL > 0)
  selected = masking.select(rng, cand_BL, rate, slots, unit_start_BL)
  L = ids_BL.shape[1]
  unit_BL = jax.lax.cummax(jnp.where(unit_start_BL, jnp.arange(L), 0), axis=1)
  in_ngram = jnp.take_along_axis(len_BL, unit_BL, 1) >= 2
  return Units(selected, selected & unit_start_BL, selected & in_ngram)


class Collapsed(NamedTuple):
  input_ids: jax.Array    # [B, L] kept tokens first, then padding
  segment_ids: jax.Array  # [B, L]
  positions: jax.Array    # [B, L] the kept tokens' original positions
  index: jax.Array        # [B, L] new index of each original token; L where it was deleted


def collapse(input_ids_BL, segment_ids_BL, positions_BL, delete_BL, pad_id=tok.PAD_ID):
  """Removes the `delete` tokens and closes the gaps: a cumsum-based compaction to length L."""
  L = input_ids_BL.shape[1]
  keep = ~delete_BL
  index = jnp.where(keep, jnp.cumsum(keep, 1) - 1, L)
  return Collapsed(_scatter_rows(L, index, input_ids_BL, pad_id),
                   _scatter_rows(L, index, segment_ids_BL, 0),
                   _scatter_rows(L, index, positions_BL, 0), index)


def expand(unit_ids_BL, segment_ids_BL, positions_BL, ngram_tokens_GN, ngram_len_G, vocab_size):
  """The inverse of `collapse` for rows whose collapsed slots hold joint ids (>= vocab_size).

  Each joint id g + vocab_size becomes its n-gram's tokens at positions p, p + 1, ...; other slots
  stay; slots expanding past L (the padding `collapse` appended) are dropped.
  """
  L = unit_ids_BL.shape[1]
  is_ngram = unit_ids_BL >= vocab_size
  g = jnp.where(is_ngram, unit_ids_BL - vocab_size, 0)
  n = jnp.where(is_ngram, ngram_len_G[g], 1)
  start = jnp.cumsum(n, 1) - n
  ids, seg, pos = (jnp.zeros_like(unit_ids_BL) for _ in range(3))
  for j in range(ngram_tokens_GN.shape[1]):
    at = jnp.where(j < n, start + j, L)  # Each output slot is written by exactly one (slot, j).
    hit = _scatter_rows(L, at, jnp.ones_like(at, bool), False)
    value = jnp.where(is_ngram, ngram_tokens_GN[g, j], unit_ids_BL)
    ids = jnp.where(hit, _scatter_rows(L, at, value, 0), ids)
    seg = jnp.where(hit, _scatter_rows(L, at, segment_ids_BL, 0), seg)
    pos = jnp.where(hit, _scatter_rows(L, at, positions_BL + j, 0), pos)
  return ids, seg, pos


def comprehensive_mask(row_segment_BL, fine_segment_BM):
  """[B, 1, L+M, L+M] bool: row slots see their segment's row slots; a fine slot sees its
  segment's row slots and itself, never another fine slot (nor does any row slot see one)."""
  seg_BT = jnp.concatenate([row_segment_BL, fine_segment_BM], 1)
  T, L = seg_BT.shape[1], row_segment_BL.shape[1]
  is_row_T = jnp.arange(T) < L
  same = seg_BT[:, :, None] == seg_BT[:, None, :]
  return ((same & is_row_T[None, None, :]) | jnp.eye(T, dtype=bool)[None])[:, None]


class ErnieGram(base.EncoderObjective):
  """Explicit n-gram MLM over the shared encoder, with the comprehensive and relation options.

  Params: encoder (exported), mlm_head (the tied head over tokens + n-grams: bias [V + G]),
  ngram_embeddings/embedding [G, E]; with ngram_relation also generator, generator_head, rtd_head.
  """

  features = ("input_ids", "segment_ids", "positions", "ngram_ids", "ngram_len")
  checks = (masking.validate_config, detection.validate_config, electra.validate_config,
            validate_config)
  input_format = "packed_ngrams"

  @classmethod
  def needs(cls, objective_config):
    del objective_config
    return frozenset({"lexicon"})

  def __init__(self, config, model_config: enc.EncoderConfig, tokenizer,
               resources=base.Resources()):
    """`resources.lexicon` is checked against the config when given (training builds it; an
    export, which only reads parameters, does not)."""
    super().__init__(config, model_config, tokenizer, resources)
    self.num_ngrams = config.ngram_vocab_size
    self.shape_fields = ("objective.ngram_vocab_size", "objective.ngram_relation") + (
        ("objective.generator_size_fraction",) if config.ngram_relation else ())
    # The joint vocabulary is unpadded: n-gram g is id V + g (a padded token table is cut to V).
    joint = dataclasses.replace(model_config, vocab_size=model_config.vocab_size + self.num_ngrams,
                                vocab_multiple=1)
    self.head_module = enc.MlmHead(joint)
    self.token_head_module = enc.MlmHead(model_config)
    if resources.lexicon is not None:
      self.check_lexicon(resources.lexicon)
    if config.ngram_relation:
      gen = electra.generator_config(model_config, config.generator_size_fraction)
      self.generator_module = enc.Encoder(gen)
      self.generator_head = enc.MlmHead(dataclasses.replace(gen, vocab_size=joint.vocab_size,
                                                            vocab_multiple=1))
      self.rtd_head = detection.DiscriminatorHead(model_config)

  # --- Data ------------------------------------------------------------------------------------

  def check_lexicon(self, lexicon):
    if len(lexicon) > self.num_ngrams or lexicon.vocab_size != self.model_config.vocab_size:
      raise ValueError(f"The lexicon ({len(lexicon)} n-grams of a {lexicon.vocab_size}-id "
                       f"vocabulary) does not fit objective.ngram_vocab_size={self.num_ngrams} "
                       f"and vocabulary {self.model_config.vocab_size}.")

  # --- Parameters ------------------------------------------------------------------------------

  def init(self, rng, batch):
    enc_rng, head_rng, ngram_rng, gen_rng, gen_head_rng, rtd_rng = jax.random.split(rng, 6)
    cfg = self.model_config
    encoder = self.init_encoder(enc_rng, batch)
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range),
                                        ("vocab", "embed"))
    ngram = {"embedding": init(ngram_rng, (self.num_ngrams, cfg.embed_dim),
                               jnp.dtype(cfg.param_dtype))}
    rows = batch["input_ids"].shape[0]
    table = jnp.zeros((cfg.vocab_size + self.num_ngrams, cfg.embed_dim))
    hidden = jnp.zeros((rows, 1, cfg.hidden_size))
    head = self.head_module.init(head_rng, hidden, table)["params"]
    params = {"encoder": encoder, "mlm_head": head, "ngram_embeddings": ngram}
    if self.config.ngram_relation:
      ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
      params["generator"] = self.generator_module.init(
          gen_rng, ids, seg, pos, shared_embeddings=nn.unbox(encoder["embeddings"]))["params"]
      gen_hidden = jnp.zeros((rows, 1, self.generator_module.config.hidden_size))
      params["generator_head"] = self.generator_head.init(gen_head_rng, gen_hidden, table)["params"]
      params["rtd_head"] = self.rtd_head.init(rtd_rng, hidden)["params"]
    return params

  def joint_table(self, params):
    """[V + G, E]: word embeddings (without padded rows), then n-gram embeddings."""
    words = enc.word_embedding_table(params["encoder"])[:self.model_config.vocab_size]
    return jnp.concatenate([words, nn.unbox(params["ngram_embeddings"]["embedding"])], 0)

  def token_head(self, params):
    """The joint head restricted to the token rows: a plain BERT MLM head (what is exported);
    the bias of padded token rows (`vocab_multiple`) is 0, and they are never predicted."""
    head, cfg = params["mlm_head"], self.model_config
    bias = nn.unbox(head["bias"])[:cfg.vocab_size]
    pad = jnp.zeros((cfg.padded_vocab_size - cfg.vocab_size,), bias.dtype)
    return {**head, "bias": jnp.concatenate([bias, pad]) if pad.size else bias}

  def token_logits(self, params, hidden_BMH):
    return self.token_head_module.apply({"params": self.token_head(params)}, hidden_BMH,
                                        enc.word_embedding_table(params["encoder"]))

  # --- Loss ------------------------------------------------------------------------------------

  def loss(self, params, state, batch, rng, *, train):
    # The first split matches MaskedLM.loss, so the evaluation probe masks as objective mlm does.
    probe_rng, rng = jax.random.split(rng)
    select_rng, corrupt_rng, dropout_rng, gen_rng, sample_rng = jax.random.split(rng, 5)
    c, V = self.config, self.model_config.vocab_size
    ids_BL, seg_BL, pos_BL = batch["input_ids"], batch["segment_ids"], batch["positions"]
    B, L = ids_BL.shape
    slots = masking.max_predictions(L, c.mask_rate)

    # Select units, corrupt, collapse the n-grams.
    special = self.special_ids
    units = select_units(select_rng, batch, c.mask_rate, slots, special)
    corrupted_BL = masking.corrupt(corrupt_rng, ids_BL, units.start & ~units.ngram, V,
                                   c.mask_token_rate, c.random_token_rate, ids=special)
    corrupted_BL = jnp.where(units.start & units.ngram, special.mask, corrupted_BL)
    row = collapse(corrupted_BL, seg_BL, pos_BL, units.selected & ~units.start, special.pad)
    start_BM, coarse_w_BM = masking.gather_selected(units.start, slots)   # original positions
    coarse_pos_BM = jnp.take_along_axis(row.index, start_BM, 1)           # positions in `row`
    is_ngram_BM = jnp.take_along_axis(units.ngram, start_BM, 1)
    coarse_tgt_BM = jnp.where(is_ngram_BM, jnp.take_along_axis(batch["ngram_ids"], start_BM, 1),
                              jnp.take_along_axis(ids_BL, start_BM, 1))
    metrics, loss = {}, 0.0

    # Enhanced relation modelling: generator samples go into the collapsed slots.
    row_ids_BL, joint_input = row.input_ids, False
    if c.ngram_relation:
      gen_logits = self.generate(params, row, coarse_pos_BM, gen_rng, train)
      gen_loss, gen_metrics = mlm.mlm_loss_and_metrics(gen_logits, coarse_tgt_BM, coarse_w_BM,
                                                       prefix="generator")
      sampled_BM = electra.gumbel_max_sample(sample_rng, jax.lax.stop_gradient(gen_logits))
      row_ids_BL = electra.scatter_slots(row_ids_BL, coarse_pos_BM, sampled_BM, coarse_w_BM)
      replaced_BM = (sampled_BM != coarse_tgt_BM).astype(jnp.int32)
      replaced_BL = electra.scatter_slots(jnp.zeros_like(row_ids_BL), coarse_pos_BM, replaced_BM,
                                          coarse_w_BM) > 0
      metrics.update(gen_metrics)
      loss = c.generator_weight * gen_loss
      joint_input = True

    # Encode the row, plus the fine-grained slots when comprehensive.
    ids_BT, seg_BT, pos_BT, attention = row_ids_BL, row.segment_ids, row.positions, None
    if c.ngram_comprehensive:
      fine_orig_BM, fine_w_BM = masking.gather_selected(units.ngram, slots)
      fine_seg_BM = jnp.where(fine_w_BM > 0, jnp.take_along_axis(seg_BL, fine_orig_BM, 1), 0)
      ids_BT = jnp.concatenate([ids_BT, jnp.full_like(fine_orig_BM, special.mask)], 1)
      seg_BT = jnp.concatenate([seg_BT, fine_seg_BM], 1)
      pos_BT = jnp.concatenate([pos_BT, jnp.take_along_axis(pos_BL, fine_orig_BM, 1)], 1)
      attention = comprehensive_mask(row.segment_ids, fine_seg_BM)
    hidden_BTH = self.encode_joint(params, ids_BT, seg_BT, pos_BT, attention, joint_input,
                                   dropout_rng, train)
    row_hidden_BLH = hidden_BTH[:, :L]

    coarse_logits = self.head_module.apply(
        {"params": params["mlm_head"]}, enc.gather_positions(row_hidden_BLH, coarse_pos_BM),
        self.joint_table(params))
    coarse_loss, coarse_metrics = mlm.mlm_loss_and_metrics(coarse_logits, coarse_tgt_BM,
                                                           coarse_w_BM, prefix="coarse")
    correct = jnp.argmax(coarse_logits, -1) == coarse_tgt_BM
    metrics.update(coarse_metrics,
                   ngram_accuracy=base.mean_metric(correct, coarse_w_BM * is_ngram_BM),
                   ngram_unit_fraction=base.mean_metric(is_ngram_BM, coarse_w_BM))
    loss = loss + coarse_loss
    if c.ngram_comprehensive:
      fine_logits = self.token_logits(params, hidden_BTH[:, L:])
      fine_loss, fine_metrics = mlm.mlm_loss_and_metrics(
          fine_logits, jnp.take_along_axis(ids_BL, fine_orig_BM, 1), fine_w_BM, prefix="fine")
      metrics.update(fine_metrics)
      loss = loss + fine_loss
    if c.ngram_relation:
      disc_logits = self.rtd_head.apply({"params": params["rtd_head"]}, row_hidden_BLH)
      disc_loss, disc_metrics = detection.detection_loss_and_metrics(disc_logits, replaced_BL,
                                                               row.segment_ids > 0)
      metrics.update(disc_metrics)
      loss = loss + c.discriminator_weight * disc_loss
    if not train:
      metrics.update(self.mlm_probe(params, batch, probe_rng))
    metrics["total_loss"] = base.mean_metric(loss, jnp.ones(()))
    return loss, (metrics, state)

  def encode_joint(self, params, ids_BT, seg_BT, pos_BT, attention, joint_input, rng, train):
    """Hidden states; ids may be joint ids (>= V) when `joint_input` (embedded from the joint
    table), and `attention` an explicit mask (None: the segment mask)."""
    embeds = jnp.take(self.joint_table(params), ids_BT, axis=0) if joint_input else None
    return self.encoder_module.apply(
        {"params": params["encoder"]}, None if joint_input else ids_BT, seg_BT, pos_BT,
        deterministic=not train, rngs={"dropout": rng}, input_embeds_BLH=embeds,
        attention_mask_B1LL=attention)

  def generate(self, params, row, coarse_pos_BM, rng, train):
    """Generator logits [B, M, V + G] at the collapsed slots of `row`."""
    hidden = self.generator_module.apply(
        {"params": params["generator"]}, row.input_ids, row.segment_ids, row.positions,
        deterministic=not train, rngs={"dropout": rng},
        shared_embeddings=params["encoder"]["embeddings"])
    return self.generator_head.apply({"params": params["generator_head"]},
                                     enc.gather_positions(hidden, coarse_pos_BM),
                                     self.joint_table(params))

  def mlm_probe(self, params, batch, rng):
    """Plain token-MLM metrics (`mlm_loss`, `mlm_accuracy`) through the token head."""
    masked = self.mask(rng, batch["input_ids"])
    hidden = self.encode(params, masked.input_ids, batch, rng, False)
    logits = self.token_logits(params, enc.gather_positions(hidden, masked.positions))
    return mlm.mlm_loss_and_metrics(logits, masked.targets, masked.weights)[1]
