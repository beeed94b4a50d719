"""On-device token selection and corruption for masked-token objectives.

Everything here is a pure function of an RNG and the token ids, traced inside the jitted train step:
a new mask every step (dynamic masking, RoBERTa) that is reproducible after a resume because the RNG
is folded with the step. Shapes are static: at most `max_predictions(L, rate)` slots per row are
gathered for the output head (BERT's `max_predictions_per_seq`), so the vocabulary projection runs
on about 15% of the positions instead of all of them.
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pretrain.data import tokenizer as tok

# Never selected for prediction; [UNK] is a real (if rare) token of the text and may be.
NON_CANDIDATE_IDS = (tok.PAD_ID, tok.CLS_ID, tok.SEP_ID, tok.MASK_ID)
FIRST_ORDINARY_ID = 5  # Random replacements are drawn from [FIRST_ORDINARY_ID, vocab_size).


class Masked(NamedTuple):
  input_ids: jax.Array   # [B, L] corrupted ids fed to the encoder
  positions: jax.Array   # [B, M] positions of the selected tokens (padded slots point at 0)
  targets: jax.Array     # [B, M] original ids at those positions
  weights: jax.Array     # [B, M] 1.0 for real slots, 0.0 for padding slots


def max_predictions(seq_len, rate):
  """Static number of prediction slots per row; always >= the number selected by `select`."""
  return max(1, math.ceil(seq_len * rate))


def candidates(input_ids):
  """[B, L] bool: tokens that may be selected (not padding or a special token)."""
  return ~jnp.isin(input_ids, jnp.asarray(NON_CANDIDATE_IDS))


def word_starts(input_ids, word_start_table):
  """[B, L] bool: a token starts a word if its piece carries the word marker or follows a special."""
  table = jnp.asarray(word_start_table, bool)
  previous = jnp.pad(input_ids[:, :-1], ((0, 0), (1, 0)), constant_values=tok.CLS_ID)
  return table[input_ids] | ~candidates(previous)


def _target_counts(cand, rate, slots):
  n = jnp.sum(cand, axis=-1)
  k = jnp.round(rate * n).astype(jnp.int32)
  return jnp.minimum(jnp.where(n > 0, jnp.maximum(k, 1), 0), slots)[:, None]   # [B, 1]


def select(rng, cand, rate, slots, starts=None):
  """[B, L] bool selection of round(rate * #candidates) tokens per row (at most `slots`).

  With `starts` (word starts), whole words are selected: words are visited in random order and
  taken while the running token count stays within the budget (the first word that would overflow
  ends the selection, so the realised rate can be slightly below `rate` for long words).
  """
  B, L = cand.shape
  k = _target_counts(cand, rate, slots)
  scores = jax.random.uniform(rng, (B, L))
  if starts is None:
    scores = jnp.where(cand, scores, -1.0)
    rank = jnp.argsort(jnp.argsort(-scores, axis=-1), axis=-1)
    return cand & (rank < k)
  idx = jnp.broadcast_to(jnp.arange(L), (B, L))
  word = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)              # index of the word's start
  scores = jnp.where(cand, jnp.take_along_axis(scores, word, 1), -1.0)  # one score per word
  order = jnp.argsort(-scores, axis=-1, stable=True)                    # words stay contiguous
  cand_sorted = jnp.take_along_axis(cand, order, 1).astype(jnp.int32)
  before_sorted = jnp.cumsum(cand_sorted, axis=1) - cand_sorted         # candidates ahead of token
  before = jnp.zeros_like(before_sorted).at[jnp.arange(B)[:, None], order].set(before_sorted)
  per_word = jax.vmap(lambda v, w: jax.ops.segment_min(v, w, num_segments=L))
  count = jax.vmap(lambda v, w: jax.ops.segment_sum(v, w, num_segments=L))
  word_before = jnp.take_along_axis(per_word(jnp.where(cand, before, L), word), word, 1)
  word_len = jnp.take_along_axis(count(cand.astype(jnp.int32), word), word, 1)
  return cand & (word_before + word_len <= k)


def gather_selected(selected, slots):
  """Positions [B, slots] of the selected tokens in order, and their 0/1 weights."""
  order = jnp.argsort(~selected, axis=-1, stable=True)[:, :slots]
  weights = jnp.take_along_axis(selected, order, 1)
  return jnp.where(weights, order, 0).astype(jnp.int32), weights.astype(jnp.float32)


def corrupt(rng, input_ids, selected, vocab_size, mask_token_rate, random_token_rate):
  """BERT's 80/10/10: selected tokens become [MASK], a random ordinary token, or stay."""
  u_rng, r_rng = jax.random.split(rng)
  u = jax.random.uniform(u_rng, input_ids.shape)
  random_ids = jax.random.randint(r_rng, input_ids.shape, FIRST_ORDINARY_ID, vocab_size)
  out = jnp.where(selected & (u < mask_token_rate), tok.MASK_ID, input_ids)
  use_random = selected & (u >= mask_token_rate) & (u < mask_token_rate + random_token_rate)
  return jnp.where(use_random, random_ids, out).astype(input_ids.dtype)


def mask_tokens(rng, input_ids, *, vocab_size, rate=0.15, mask_token_rate=0.8,
                random_token_rate=0.1, word_start_table=None):
  """Selects and corrupts tokens for masked-LM-style objectives; returns a `Masked`."""
  select_rng, corrupt_rng = jax.random.split(rng)
  slots = max_predictions(input_ids.shape[1], rate)
  cand = candidates(input_ids)
  starts = None if word_start_table is None else word_starts(input_ids, word_start_table)
  selected = select(select_rng, cand, rate, slots, starts)
  positions, weights = gather_selected(selected, slots)
  corrupted = corrupt(corrupt_rng, input_ids, selected, vocab_size, mask_token_rate,
                      random_token_rate)
  targets = jnp.take_along_axis(input_ids, positions, 1)
  return Masked(corrupted, positions, targets, weights)


def mask_with_config(rng, input_ids, config, vocab_size, word_start_table=None):
  """`mask_tokens` with the rates of an objective's config block (`config.objective`)."""
  return mask_tokens(rng, input_ids, vocab_size=vocab_size, rate=config.mask_rate,
                     mask_token_rate=config.mask_token_rate,
                     random_token_rate=config.random_token_rate,
                     word_start_table=word_start_table)
