"""Masked-token accuracy on the held-out stdlib files: what a model's MLM head gets right there.

`masked_rows(tokenizer, texts, ...)` cuts each text's ids into "[CLS] chunk [SEP]" rows and masks
`MASK_RATE` of each row's tokens (BERT's 80% [MASK] / 10% random / 10% kept) with a seeded numpy
generator, so every model with that tokenizer is scored on the same slots. `accuracy` runs the
encoder and the MLM head at those slots. `unigram_accuracy` is the reference: always guessing the
rows' most frequent token.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from objectives import masking
from pretrain.models import encoder as enc

MASK_RATE = 0.15


class MaskedRows(NamedTuple):
  input_ids: np.ndarray   # [N, L] int32, corrupted
  segment_ids: np.ndarray  # [N, L] 1 on tokens, 0 on padding
  positions: np.ndarray   # [N, M] the masked slots (padded slots point at 0)
  targets: np.ndarray     # [N, M] the original ids
  weights: np.ndarray     # [N, M] 1 for a real slot
  original: np.ndarray    # [N, L] the uncorrupted ids


def masked_rows(tokenizer, texts, seq_len: int, max_rows: int, seed: int = 0) -> MaskedRows:
  """Up to `max_rows` rows of `seq_len` ids from `texts` (chunks drawn evenly by a seeded
  permutation, kept in text order), each with round(MASK_RATE x tokens) masked slots."""
  ids = masking.SpecialIds.of(tokenizer)
  vocab = int(tokenizer.vocab_size)
  chunks = [piece[i:i + seq_len - 2] for piece in tokenizer.encode_batch(list(texts))
            for i in range(0, len(piece), seq_len - 2)]
  chunks = [c for c in chunks if len(c) >= 8]
  rng = np.random.default_rng(seed)
  if len(chunks) > max_rows:
    chunks = [chunks[i] for i in sorted(rng.permutation(len(chunks))[:max_rows])]
  n, slots = len(chunks), max(1, round(MASK_RATE * (seq_len - 2)))
  original = np.full((n, seq_len), ids.pad, np.int32)
  segment = np.zeros((n, seq_len), np.int32)
  positions, targets = np.zeros((n, slots), np.int32), np.zeros((n, slots), np.int32)
  weights = np.zeros((n, slots), np.float32)
  for r, chunk in enumerate(chunks):
    row = [ids.cls, *chunk, ids.sep]
    original[r, :len(row)], segment[r, :len(row)] = row, 1
    m = max(1, round(MASK_RATE * len(chunk)))
    chosen = np.sort(1 + rng.permutation(len(chunk))[:m])
    positions[r, :m], targets[r, :m], weights[r, :m] = chosen, original[r, chosen], 1.0
  corrupted = original.copy()
  draw = rng.random(positions.shape)
  random_ids = rng.integers(ids.first_ordinary, vocab, positions.shape)
  for r in range(n):
    real = weights[r] > 0
    p = positions[r, real]
    corrupted[r, p] = np.where(draw[r, real] < 0.8, ids.mask,
                               np.where(draw[r, real] < 0.9, random_ids[r, real],
                                        original[r, p]))
  return MaskedRows(corrupted, segment, positions, targets, weights, original)


@functools.partial(jax.jit, static_argnames=("config",))
def _predict(encoder_params, head_params, ids_BL, segment_BL, positions_BM, *, config):
  pos_BL = jnp.broadcast_to(jnp.arange(ids_BL.shape[1]), ids_BL.shape)
  hidden_BLH = enc.Encoder(config).apply({"params": encoder_params}, ids_BL, segment_BL, pos_BL)
  logits_BMV = enc.MlmHead(config).apply({"params": head_params},
                                         enc.gather_positions(hidden_BLH, positions_BM),
                                         enc.word_embedding_table(encoder_params))
  return jnp.argmax(logits_BMV, -1)


def accuracy(config, encoder_params, head_params, rows: MaskedRows, batch_size: int = 16):
  """(accuracy over the masked slots, the number of slots) of an encoder and its MLM head."""
  encoder_params = jax.tree.map(jnp.asarray, encoder_params)
  head_params = jax.tree.map(jnp.asarray, head_params)
  correct = total = 0.0
  n = len(rows.input_ids)
  for start in range(0, n, batch_size):
    take = np.arange(start, start + batch_size) % n  # Fixed shape: the last batch wraps around.
    real = (np.arange(start, start + batch_size) < n)[:, None] * rows.weights[take]
    pred = np.asarray(_predict(encoder_params, head_params, rows.input_ids[take],
                               rows.segment_ids[take], rows.positions[take], config=config))
    correct += float(np.sum((pred == rows.targets[take]) * real))
    total += float(np.sum(real))
  return correct / max(total, 1.0), int(total)


def unigram_accuracy(rows: MaskedRows, tokenizer) -> float:
  """The accuracy of always answering the most frequent ordinary token of the rows."""
  ids = masking.SpecialIds.of(tokenizer)
  tokens = rows.original[rows.segment_ids > 0]
  tokens = tokens[~np.isin(tokens, ids.non_candidates)]
  top = np.bincount(tokens).argmax()
  return float(np.sum((rows.targets == top) * rows.weights) / np.sum(rows.weights))


def random_init(config, seed: int = 0):
  """(encoder params, MLM head params) of `config` from random weights: the control."""
  ids = jnp.ones((1, 8), jnp.int32)
  enc_rng, head_rng = jax.random.split(jax.random.key(seed))
  encoder = nn.unbox(enc.Encoder(config).init(enc_rng, ids, ids, ids)["params"])
  table = jnp.zeros((config.padded_vocab_size, config.embed_dim))
  head = nn.unbox(enc.MlmHead(config).init(head_rng, jnp.zeros((1, 1, config.hidden_size)),
                                           table)["params"])
  return encoder, head


def head_fits(config, head_params) -> bool:
  """Whether an MLM head predicts exactly the token vocabulary (ERNIE-Gram's joint one does not)."""
  bias = head_params.get("bias") if isinstance(head_params, dict) else None
  return bias is not None and np.shape(nn.unbox(bias))[0] == config.padded_vocab_size
