"""RetroMAE (Xiao et al., 2022) and DupMAE (RetroMAE v2, Xiao et al., 2023): masked auto-encoding
through a sentence embedding, so that the [CLS] state must carry the text.

As in the official code (staoxiao/RetroMAE):
- Encoder: the shared encoder with MLM at objective.mask_rate (0.3 in configs/dupmae.py; whole
  words; 80/10/10); the sentence embedding h is the final state at [CLS].
- Decoder: ONE BERT layer (`pretrain.models.decoder.DecoderLayer`). Query row i is the embedding
  module applied to h (h + position_i + token type 0, LayerNorm, dropout); keys/values are h at the
  [CLS] slot and the embeddings of the ORIGINAL (unmasked) tokens elsewhere.
- Enhanced decoding: every query row has its own attention mask (`decoder_attention_mask`): it
  never sees itself, always sees h, and sees each other ordinary token of its sentence with
  probability 1 - decoder_mask_rate (0.5), a whole word at a time when whole_word is set; [SEP]
  stays visible, as the official collator never masks special tokens. Labels: every token but the
  first and last ([CLS], [SEP]) of each sentence.
- Embeddings and the MLM head are shared by encoder and decoder. RetroMAE loss = encoder MLM +
  decoder MLM.
- DupMAE adds bow_weight (0.1) x the bag-of-words loss: the encoder's MLM logits at every ordinary
  position are max-pooled over the sentence, and their softmax is fitted (cross-entropy) to the
  uniform distribution over the distinct ordinary token ids of the original sentence.

Our choices, where the official code differs or is silent:
- Packed rows: every packed segment ([CLS] chunk [SEP]) is its own sentence, with its own h at its
  [CLS] slot, and its decoder rows attend only inside the segment. Why: the packing pipeline, its
  checkpointable iterator and its token throughput stay the ones MLM uses, so the objectives are
  compared on the same data at the same cost per token; one chunk per row would pad the short last
  chunk of every document instead.
- The decoder masks are drawn on device, independently per query row, by one uniform per (row,
  word) compared with decoder_mask_rate: O(B L^2) elementwise work and no sort. The official
  collator builds them per example on the host (exactly round(0.5 n) tokens per row, rows drawn
  from 128 shared masks), which made its training CPU-bound; the visible fraction is 0.5 in
  expectation here.
- The BoW pools over ordinary tokens only (the official code also pools the [SEP] position).
"""
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from objectives import base, checks, masking, mlm
from pretrain.models import decoder as dec, encoder as enc

CONFIG = dict(
    decoder_mask_rate=0.5,  # retromae, dupmae: share of a sentence's ordinary tokens each decoder
                            # row does not see
    bow_weight=0.1,         # dupmae: weight of the bag-of-words loss
)
NAMES = ("retromae", "dupmae")
DECODER_FILE = "decoder.msgpack"  # Beside an export's BertForMaskedLM files.


def validate_config(config):
  o, m = config.objective, config.model
  checks.require(0 <= o.decoder_mask_rate < 1, "objective.decoder_mask_rate", o.decoder_mask_rate,
                 "0 <= rate < 1")
  checks.require(o.bow_weight >= 0, "objective.bow_weight", o.bow_weight, ">= 0")
  checks.require(o.name not in NAMES or m.embedding_size in (0, m.hidden_size),
                 "model.embedding_size", m.embedding_size,
                 f"0 or model.hidden_size={m.hidden_size} for {o.name}: the decoder feeds the "
                 f"sentence embedding through the embedding module")


def sentence_slots(segment_ids_BL, positions_BL):
  """[B, L] bool: the [CLS] slot of each sentence (position 0 of a segment), where h lives."""
  return (positions_BL == 0) & (segment_ids_BL > 0)


def sentence_starts(positions_BL):
  """[B, L] index of each token's [CLS] slot (positions restart at 0 in every segment)."""
  return jnp.arange(positions_BL.shape[1])[None, :] - positions_BL


def decoder_labels(input_ids_BL, ids=masking.SENTENCEPIECE):
  """[B, L] 0/1 weights of the decoder's targets: all tokens but each sentence's [CLS] and [SEP]."""
  return masking.candidates(input_ids_BL, ids).astype(jnp.float32)


def decoder_attention_mask(rng, input_ids_BL, segment_ids_BL, positions_BL, rate,
                           word_start_table=None, ids=masking.SENTENCEPIECE):
  """[B, L, L] bool, query row x key: what each decoder row may attend to.

  Row i (an ordinary token) sees h, never itself, nothing outside its segment, and each other
  ordinary token with probability 1 - rate; with `word_start_table` all tokens of a word share one
  draw per row. [CLS] rows are no labels (they see h); padding rows see the padding (no empty row).
  """
  B, L = input_ids_BL.shape
  u_BLL = jax.random.uniform(rng, (B, L, L))
  if word_start_table is not None:
    starts_BL = masking.word_starts(input_ids_BL, word_start_table, ids)
    word_BL = jax.lax.cummax(jnp.where(starts_BL, jnp.arange(L)[None, :], 0), axis=1)
    u_BLL = jnp.take_along_axis(u_BLL, jnp.broadcast_to(word_BL[:, None, :], (B, L, L)), axis=2)
  ordinary_B1L = masking.candidates(input_ids_BL, ids)[:, None, :]
  keep_BLL = (u_BLL >= rate) | ~ordinary_B1L
  not_self_LL = ~jnp.eye(L, dtype=bool)
  h_B1L = sentence_slots(segment_ids_BL, positions_BL)[:, None, :]
  same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  padding_BL1 = (segment_ids_BL == 0)[:, :, None]
  return same_BLL & ((keep_BLL & not_self_LL) | h_B1L | padding_BL1)


def sentence_bags(input_ids_BL, segment_ids_BL, max_sentences, ids=masking.SENTENCEPIECE):
  """[B, L] bag of each token: b * S + s - 1 for an ordinary token of segment s of row b (S =
  max_sentences), B * S (a slot that is dropped) for special tokens and padding."""
  B, _ = input_ids_BL.shape
  S = max_sentences
  ordinary = masking.candidates(input_ids_BL, ids) & (segment_ids_BL <= S)
  return jnp.where(ordinary, jnp.arange(B)[:, None] * S + segment_ids_BL - 1, B * S)


def bow_targets(input_ids_BL, segment_ids_BL, vocab_size, max_sentences, ids=masking.SENTENCEPIECE):
  """[B * S, V] target distributions: uniform over the distinct ordinary ids of each sentence
  (all-zero rows for empty slots), and [B * S] weights (1 where the sentence has a token)."""
  B, _ = input_ids_BL.shape
  bag_BL = sentence_bags(input_ids_BL, segment_ids_BL, max_sentences, ids)
  present_NV = jnp.zeros((B * max_sentences + 1, vocab_size), jnp.float32)
  present_NV = present_NV.at[bag_BL.ravel(), input_ids_BL.ravel()].set(1.0)[:-1]
  count_N = jnp.sum(present_NV, -1)
  return present_NV / jnp.maximum(count_N, 1.0)[:, None], (count_N > 0).astype(jnp.float32)


def bag_of_words_loss(logits_BLV, input_ids_BL, segment_ids_BL, ids=masking.SENTENCEPIECE):
  """DupMAE's BoW loss: per sentence, CE(uniform over its distinct ids, softmax(max-pooled
  logits of its ordinary tokens)); the mean over sentences and the `(total, count)` metric."""
  B, L, V = logits_BLV.shape
  S = L // 3  # A sentence holds at least [CLS] token [SEP].
  bag_BL = sentence_bags(input_ids_BL, segment_ids_BL, S, ids)
  pooled_NV = jax.ops.segment_max(logits_BLV.reshape(B * L, V).astype(jnp.float32),
                                  bag_BL.ravel(), num_segments=B * S + 1)[:-1]
  targets_NV, weights_N = bow_targets(input_ids_BL, segment_ids_BL, V, S, ids)
  pooled_NV = jnp.where(weights_N[:, None] > 0, pooled_NV, 0.0)  # Empty slots hold -inf.
  ce_N = -jnp.sum(targets_NV * jax.nn.log_softmax(pooled_NV, -1), -1)
  loss = jnp.sum(ce_N * weights_N) / jnp.maximum(jnp.sum(weights_N), 1.0)
  return loss, {"bow_loss": base.mean_metric(ce_N, weights_N)}


class RetroMAE(mlm.MaskedLM):
  """Encoder MLM + enhanced-decoding MLM. Params: encoder, mlm_head (shared), decoder."""

  checks = (masking.validate_config, validate_config)

  def __init__(self, config, model_config: enc.EncoderConfig, tokenizer, resources=base.Resources()):
    if model_config.projects_embeddings:
      raise ValueError(f"{config.name} needs model.embedding_size 0 (= hidden_size): the decoder "
                       f"feeds h through the embedding module.")
    super().__init__(config, model_config, tokenizer, resources)
    self.decoder_module = dec.DecoderLayer(model_config)
    self.embeddings_module = enc.Embeddings(model_config)

  def init(self, rng, batch):
    mlm_rng, decoder_rng = jax.random.split(rng)
    params = super().init(mlm_rng, batch)
    B, L = batch["input_ids"].shape
    x_BLH = jnp.zeros((B, L, self.model_config.hidden_size))
    decoder = self.decoder_module.init(decoder_rng, x_BLH, x_BLH, jnp.ones((B, 1, L, L), bool),
                                       batch["positions"])
    return {**params, "decoder": decoder["params"]}

  def export_extras(self, out_dir, params):
    """Writes the decoder layer as decoder.msgpack; the embeddings and MLM head it shares are the
    exported BertForMaskedLM's, so the two together continue pretraining (`with_decoder`)."""
    decoder = jax.tree.map(np.asarray, params["decoder"])
    (epath.Path(out_dir) / DECODER_FILE).write_bytes(flax.serialization.msgpack_serialize(decoder))

  def import_extras(self, model_dir, params):
    """`init_from=<export>`: the exported decoder too; a plain BERT directory has none (the
    decoder then starts fresh, as RetroMAE's does from BERT)."""
    if not (epath.Path(model_dir) / DECODER_FILE).exists():
      return params
    return with_decoder(params, model_dir)

  def decode(self, params, hidden_BLH, batch, rng, train):
    """Decoder logits [B, L, V] at every position, from the encoder's final states."""
    ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
    mask_rng, query_rng, kv_rng, layer_rng = jax.random.split(rng, 4)
    mask_BLL = decoder_attention_mask(mask_rng, ids, seg, pos, self.config.decoder_mask_rate,
                                      self.word_start_table, self.special_ids)
    embed = lambda ids_BL, x_BLH, r: self.embeddings_module.apply(  # noqa: E731
        {"params": params["encoder"]["embeddings"]}, ids_BL, pos, x_BLH,
        deterministic=not train, rngs={"dropout": r})
    h_BLH = enc.gather_positions(hidden_BLH, sentence_starts(pos))
    query_BLH = embed(None, h_BLH, query_rng)
    kv_BLH = jnp.where(sentence_slots(seg, pos)[..., None], hidden_BLH.astype(query_BLH.dtype),
                       embed(ids, None, kv_rng))
    out_BLH = self.decoder_module.apply({"params": params["decoder"]}, query_BLH, kv_BLH,
                                        mask_BLL[:, None], pos, deterministic=not train,
                                        rngs={"dropout": layer_rng})
    return self.head_module.apply({"params": params["mlm_head"]}, out_BLH,
                                  enc.word_embedding_table(params["encoder"]))

  def encoder_terms(self, params, hidden_BLH, masked, batch):
    """The encoder's loss and metrics: MLM at the masked slots."""
    del batch
    logits_BMV = self.head_module.apply({"params": params["mlm_head"]},
                                        enc.gather_positions(hidden_BLH, masked.positions),
                                        enc.word_embedding_table(params["encoder"]))
    return mlm.mlm_loss_and_metrics(logits_BMV, masked.targets, masked.weights, "encoder_mlm")

  def loss(self, params, state, batch, rng, *, train):
    mask_rng, encoder_rng, decoder_rng = jax.random.split(rng, 3)
    ids = batch["input_ids"]
    masked = self.mask(mask_rng, ids)
    hidden_BLH = self.encode(params, masked.input_ids, batch, encoder_rng, train)
    encoder_loss, metrics = self.encoder_terms(params, hidden_BLH, masked, batch)
    decoder_logits_BLV = self.decode(params, hidden_BLH, batch, decoder_rng, train)
    decoder_loss, decoder_metrics = mlm.mlm_loss_and_metrics(
        decoder_logits_BLV, ids, decoder_labels(ids, self.special_ids), "decoder_mlm")
    loss = encoder_loss + decoder_loss
    metrics.update(decoder_metrics, total_loss=base.mean_metric(loss, jnp.ones(())))
    return loss, (metrics, state)


def with_decoder(params, export_dir):
  """`params` (of a RetroMAE / DupMAE objective) with the decoder of an export directory; shapes
  must match. `init_from=<export>` restores the encoder and MLM head from the same directory."""
  path = epath.Path(export_dir) / DECODER_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path}: no decoder; export a retromae or dupmae workdir with "
                            f"pretrain.export.")
  loaded = flax.serialization.msgpack_restore(path.read_bytes())
  expected = jax.tree_util.tree_flatten_with_path(params["decoder"])[0]
  got = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  for key, value in expected:
    if key not in got or np.shape(got[key]) != np.shape(value):
      raise ValueError(f"{path}: decoder parameter {jax.tree_util.keystr(key)} is "
                       f"{np.shape(got[key]) if key in got else 'missing'} there but "
                       f"{np.shape(value)} in this model; make config.model match the export.")
  decoder = jax.tree.map(lambda old, new: np.asarray(new, np.asarray(old).dtype),
                         params["decoder"], loaded)
  return {**params, "decoder": decoder}


class DupMAE(RetroMAE):
  """RetroMAE + bow_weight x the bag-of-words loss over the encoder's max-pooled MLM logits.

  The head runs at every position once (the BoW needs them all); the MLM loss reads its masked
  slots from the same logits.
  """

  def encoder_terms(self, params, hidden_BLH, masked, batch):
    logits_BLV = self.head_module.apply({"params": params["mlm_head"]}, hidden_BLH,
                                        enc.word_embedding_table(params["encoder"]))
    mlm_loss, metrics = mlm.mlm_loss_and_metrics(
        enc.gather_positions(logits_BLV, masked.positions), masked.targets, masked.weights,
        "encoder_mlm")
    bow_loss, bow_metrics = bag_of_words_loss(logits_BLV, batch["input_ids"],
                                              batch["segment_ids"], self.special_ids)
    metrics.update(bow_metrics)
    return mlm_loss + self.config.bow_weight * bow_loss, metrics
