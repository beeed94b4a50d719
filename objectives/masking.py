"""On-device token selection and corruption for masked-token objectives.

Everything here is a pure function of an RNG and the token ids, traced inside the jitted train step:
a new mask every step (dynamic masking, RoBERTa) that is reproducible after a resume because the RNG
is folded with the step. Shapes are static: at most `max_predictions(L, rate)` slots per row are
gathered for the output head (BERT's `max_predictions_per_seq`), so the vocabulary projection runs
on about 15% of the positions instead of all of them.

`objective.masking_strategy` chooses what is selected (every objective that masks through
`mask_with_config` or `select_with_config` gets it):
- "token": independent tokens (BERT), or whole words with `whole_word=True` (BERT-wwm);
- "whole_word": whole words, the same as "token" with `whole_word=True` (either loads the
  tokenizer's word-start table, see `uses_word_starts`);
- "span": contiguous spans of n units with p(n) proportional to 1/n for n <= max_span (Megatron-LM's
  and ALBERT's n-gram masking, max 3), 80/10/10 drawn per token as they do;
- "geometric": SpanBERT: n ~ Geo(geometric_p = 0.2) truncated at geometric_max_span = 10 and
  renormalised, 80/10/10 drawn once per span ("all the tokens in a span are replaced with [MASK] or
  sampled tokens").
A unit is a token, or a whole word when `whole_word=True` (SpanBERT and ALBERT count spans in
words).

How spans are drawn, in parallel and with static shapes (our formulation; the reference code loops
over random start positions on the host): the units of every run of ordinary tokens (the text
between two special tokens, so a span never crosses [CLS], [SEP], a packed document boundary or
padding) are cut into consecutive spans whose lengths are i.i.d. draws from p(n), the last span of
a run cut short at its end; spans are then visited in random order and taken while the token budget
round(rate * #candidates) lasts. The span that would overflow the budget is cut to the units that
still fit (Megatron and ALBERT skip it and try the next span instead, which is sequential; both
favour short spans at the very end). Because spans are chosen uniformly among the spans of the
tiling, the length of a selected span follows p(n) (except for spans cut at a run's end or at the
budget). The tiling is a renewal process from each run's first unit: span starts are the units
reachable from it by jumps u -> u + n(u), found in log2(L) pointer-doubling steps.
"""
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from objectives import checks
from pretrain.data import tokenizer as tok

STRATEGIES = ("token", "whole_word", "span", "geometric")

CONFIG = dict(
    masking_strategy="token",  # token | whole_word | span (p(n) ~ 1/n) | geometric (SpanBERT)
    max_span=3,                # span: longest span in units (Megatron / ALBERT: 3)
    geometric_p=0.2,           # geometric: SpanBERT's Geo(p)
    geometric_max_span=10,     # geometric: lengths truncated at this and renormalised
)



class SpecialIds(NamedTuple):
  """The ids masking treats specially. Defaults: our sentencepiece tokenizer's reserved ids 0..4.

  A third-party vocabulary (BERT's WordPiece: [PAD] 0, [CLS] 101, [SEP] 102, [MASK] 103, and
  [unusedN] placeholders up to id 998) brings its own, from `SpecialIds.of(tokenizer)`.
  [PAD] [CLS] [SEP] [MASK] are never selected; [UNK] is a real (if rare) token of the text and may
  be. Random replacements are drawn from [first_ordinary, vocab_size).
  """
  pad: int = tok.PAD_ID
  cls: int = tok.CLS_ID
  sep: int = tok.SEP_ID
  mask: int = tok.MASK_ID
  first_ordinary: int = len(tok.RESERVED)

  @classmethod
  def of(cls, tokenizer):
    """A tokenizer's ids (a stand-in without the attributes gets the defaults)."""
    fields = ("pad_id", "cls_id", "sep_id", "mask_id", "first_ordinary_id")
    return cls(*(int(getattr(tokenizer, f, d)) for f, d in zip(fields, cls._field_defaults.values())))

  @property
  def non_candidates(self):
    return (self.pad, self.cls, self.sep, self.mask)


SENTENCEPIECE = SpecialIds()
FIRST_ORDINARY_ID = SENTENCEPIECE.first_ordinary


class Strategy(NamedTuple):
  """What `select_units` picks: single units, or spans whose lengths follow `span_probs`."""
  span_probs: Optional[tuple] = None  # p(n) for n = 1..len; None: units one at a time
  span_corruption: bool = False       # one 80/10/10 draw per span (SpanBERT), not per token


TOKENS = Strategy()


class Masked(NamedTuple):
  input_ids: jax.Array   # [B, L] corrupted ids fed to the encoder
  positions: jax.Array   # [B, M] positions of the selected tokens (padded slots point at 0)
  targets: jax.Array     # [B, M] original ids at those positions
  weights: jax.Array     # [B, M] 1.0 for real slots, 0.0 for padding slots


def max_predictions(seq_len, rate):
  """Static number of prediction slots per row; always >= the number selected by `select`."""
  return max(1, math.ceil(seq_len * rate))


def candidates(input_ids, ids=SENTENCEPIECE):
  """[B, L] bool: tokens that may be selected (not padding or a special token)."""
  return ~jnp.isin(input_ids, jnp.asarray(ids.non_candidates))


def word_starts(input_ids, word_start_table, ids=SENTENCEPIECE):
  """[B, L] bool: a token starts a word if its piece carries the word marker or follows a special."""
  table = jnp.asarray(word_start_table, bool)
  previous = jnp.pad(input_ids[:, :-1], ((0, 0), (1, 0)), constant_values=ids.cls)
  return table[input_ids] | ~candidates(previous, ids)


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


def corrupt(rng, input_ids, selected, vocab_size, mask_token_rate, random_token_rate,
            group_BL=None, ids=SENTENCEPIECE):
  """BERT's 80/10/10: selected tokens become [MASK], a random ordinary token, or stay.

  With `group_BL` (the index of a token that stands for each token's group, e.g. its span start),
  the choice between the three is made once per group; random ids are still drawn per token.
  """
  u_rng, r_rng = jax.random.split(rng)
  u = jax.random.uniform(u_rng, input_ids.shape)
  if group_BL is not None:
    u = jnp.take_along_axis(u, group_BL, 1)
  random_ids = jax.random.randint(r_rng, input_ids.shape, ids.first_ordinary, vocab_size)
  out = jnp.where(selected & (u < mask_token_rate), ids.mask, input_ids)
  use_random = selected & (u >= mask_token_rate) & (u < mask_token_rate + random_token_rate)
  return jnp.where(use_random, random_ids, out).astype(input_ids.dtype)


def span_length_probs(strategy, max_span=3, geometric_p=0.2, geometric_max_span=10):
  """p(n) for n = 1, 2, ... (a numpy vector) of a span strategy; None for "token"/"whole_word"."""
  if strategy == "span":
    weights = 1.0 / np.arange(1, max_span + 1)
  elif strategy == "geometric":
    weights = geometric_p * (1 - geometric_p) ** np.arange(geometric_max_span)
  elif strategy in ("token", "whole_word"):
    return None
  else:
    raise ValueError(f"Unknown masking strategy {strategy!r}; valid: {', '.join(STRATEGIES)}.")
  return weights / weights.sum()


def strategy_from_config(config) -> Strategy:
  """The `Strategy` of an objective's config block (a saved config without the keys: tokens)."""
  name = config.get("masking_strategy", "token")
  probs = span_length_probs(name, config.get("max_span", 3), config.get("geometric_p", 0.2),
                            config.get("geometric_max_span", 10))
  if probs is None:
    return TOKENS
  return Strategy(tuple(float(p) for p in probs), span_corruption=name == "geometric")


def uses_word_starts(config) -> bool:
  """Whether masking needs the tokenizer's word-start table (units are whole words)."""
  return bool(config.whole_word) or config.get("masking_strategy", "token") == "whole_word"


def validate_config(config):
  o = config.objective
  checks.require(o.masking_strategy in STRATEGIES, "objective.masking_strategy",
                 o.masking_strategy, ", ".join(STRATEGIES))
  checks.require(isinstance(o.max_span, int) and 1 <= o.max_span <= config.data.seq_len,
                 "objective.max_span", o.max_span, "an int in [1, data.seq_len]")
  checks.require(0 < o.geometric_p <= 1, "objective.geometric_p", o.geometric_p, "0 < p <= 1")
  checks.require(isinstance(o.geometric_max_span, int)
                 and 1 <= o.geometric_max_span <= config.data.seq_len,
                 "objective.geometric_max_span", o.geometric_max_span,
                 "an int in [1, data.seq_len]")


def _row_scatter(shape, index_BN, values_BN, fill, mode):
  """[B, size] array of `fill` with values_BN scattered (max/min/set) at index_BN per row."""
  rows = jnp.arange(index_BN.shape[0])[:, None]
  out = jnp.full(shape, fill, values_BN.dtype)
  return getattr(out.at[rows, index_BN], mode)(values_BN)


def span_tiling(rng, cand_BL, unit_start_BL, span_probs):
  """[B, L] bool: the units (token positions) that start a span; see the module docstring.

  `unit_start_BL` marks the first token of every unit (every candidate token, or word starts); a
  run of candidates always starts a unit. Spans are counted in units and never leave a run.
  """
  B, L = cand_BL.shape
  idx_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
  unit_start_BL = unit_start_BL & cand_BL
  unit_rank_BL = jnp.cumsum(unit_start_BL, 1) - 1               # unit number of each token
  num_units_B1 = jnp.sum(unit_start_BL, 1, keepdims=True)
  # Position of the u-th unit's first token (L for u >= the number of units).
  unit_pos_BU = _row_scatter((B, L + 1), jnp.where(unit_start_BL, unit_rank_BL, L), idx_BL, L,
                             "set")[:, :L]
  prev_cand_BL = jnp.pad(cand_BL[:, :-1], ((0, 0), (1, 0)))
  run_BL = jnp.cumsum(cand_BL & ~prev_cand_BL, 1)                 # run number of each token
  valid_BU = jnp.arange(L) < num_units_B1
  run_BU = jnp.where(valid_BU, jnp.take_along_axis(run_BL, jnp.minimum(unit_pos_BU, L - 1), 1), -1)
  logits = jnp.log(jnp.asarray(span_probs, jnp.float32))
  n_BU = 1 + jax.random.categorical(rng, logits, shape=(B, L))
  nxt_BU = jnp.arange(L) + n_BU
  same_run = jnp.take_along_axis(run_BU, jnp.minimum(nxt_BU, L - 1), 1) == run_BU
  nxt_BU = jnp.where(valid_BU & (nxt_BU < L) & same_run, nxt_BU, L)   # L: past the run's end
  first_BU = valid_BU & (run_BU != jnp.pad(run_BU[:, :-1], ((0, 0), (1, 0)), constant_values=-1))
  # Pointer doubling: after k steps `reach` holds every unit reachable in fewer than 2^k jumps.
  reach = jnp.pad(first_BU, ((0, 0), (0, 1))).astype(jnp.int32)
  jump = jnp.pad(nxt_BU, ((0, 0), (0, 1)), constant_values=L)
  for _ in range(max(1, math.ceil(math.log2(L)))):
    reach = jnp.maximum(reach, _row_scatter((B, L + 1), jump, reach, 0, "max"))
    jump = jnp.take_along_axis(jump, jump, 1)
  span_start_BU = (reach[:, :L] > 0) & valid_BU
  return unit_start_BL & jnp.take_along_axis(span_start_BU, jnp.maximum(unit_rank_BL, 0), 1)


def select_spans(rng, cand_BL, k_B1, span_start_BL, unit_start_BL):
  """[B, L] bool: spans in random order while k tokens last; the overflowing span keeps the units
  that still fit. Returns (selected, span_BL: the position of each token's span start)."""
  B, L = cand_BL.shape
  idx_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
  span_BL = jax.lax.cummax(jnp.where(span_start_BL, idx_BL, 0), axis=1)
  unit_BL = jax.lax.cummax(jnp.where(unit_start_BL & cand_BL, idx_BL, 0), axis=1)
  scores = jax.random.uniform(rng, (B, L))
  scores = jnp.where(cand_BL, jnp.take_along_axis(scores, span_BL, 1), -1.0)
  order = jnp.argsort(-scores, axis=-1, stable=True)          # spans contiguous, in text order
  cand_sorted = jnp.take_along_axis(cand_BL, order, 1).astype(jnp.int32)
  through = _row_scatter((B, L), order, jnp.cumsum(cand_sorted, 1), 0, "set")
  unit_end = jax.vmap(lambda v, u: jax.ops.segment_max(v, u, num_segments=L))(
      jnp.where(cand_BL, through, 0), unit_BL)
  return cand_BL & (jnp.take_along_axis(unit_end, unit_BL, 1) <= k_B1), span_BL


def select_units(rng, input_ids, rate, slots, word_start_table=None, strategy=TOKENS,
                 ids=SENTENCEPIECE):
  """[B, L] bool selection of about round(rate * #candidates) tokens per row, and the index of
  each token's span start ([B, L], or None when units are selected one at a time)."""
  cand = candidates(input_ids, ids)
  starts = None if word_start_table is None else word_starts(input_ids, word_start_table, ids)
  if strategy.span_probs is None:
    return select(rng, cand, rate, slots, starts), None
  tile_rng, pick_rng = jax.random.split(rng)
  units = cand if starts is None else starts & cand
  span_starts = span_tiling(tile_rng, cand, units, strategy.span_probs)
  return select_spans(pick_rng, cand, _target_counts(cand, rate, slots), span_starts, units)


def _check_word_starts(config, word_start_table):
  if word_start_table is None and config.get("masking_strategy", "token") == "whole_word":
    raise ValueError("objective.masking_strategy='whole_word' needs the tokenizer's word-start "
                     "table; build the objective with the tokenizer (see uses_word_starts).")


def select_with_config(rng, input_ids, config, word_start_table=None, ids=SENTENCEPIECE):
  """[B, L] bool: the tokens an objective's config selects (for objectives that do not predict)."""
  _check_word_starts(config, word_start_table)
  slots = max_predictions(input_ids.shape[1], config.mask_rate)
  return select_units(rng, input_ids, config.mask_rate, slots, word_start_table,
                      strategy_from_config(config), ids)[0]


def mask_tokens(rng, input_ids, *, vocab_size, rate=0.15, mask_token_rate=0.8,
                random_token_rate=0.1, word_start_table=None, strategy=TOKENS,
                ids=SENTENCEPIECE):
  """Selects and corrupts tokens for masked-LM-style objectives; returns a `Masked`."""
  select_rng, corrupt_rng = jax.random.split(rng)
  slots = max_predictions(input_ids.shape[1], rate)
  selected, span_BL = select_units(select_rng, input_ids, rate, slots, word_start_table, strategy,
                                   ids)
  positions, weights = gather_selected(selected, slots)
  corrupted = corrupt(corrupt_rng, input_ids, selected, vocab_size, mask_token_rate,
                      random_token_rate, span_BL if strategy.span_corruption else None, ids)
  targets = jnp.take_along_axis(input_ids, positions, 1)
  return Masked(corrupted, positions, targets, weights)


def mask_with_config(rng, input_ids, config, vocab_size, word_start_table=None, ids=SENTENCEPIECE,
                     *, mask_token_rate=None, random_token_rate=None):
  """`mask_tokens` with the rates and strategy of an objective's config block (the corruption
  rates can be overridden: SLM replaces every selected token)."""
  _check_word_starts(config, word_start_table)
  return mask_tokens(
      rng, input_ids, vocab_size=vocab_size, rate=config.mask_rate,
      mask_token_rate=config.mask_token_rate if mask_token_rate is None else mask_token_rate,
      random_token_rate=config.random_token_rate if random_token_rate is None else random_token_rate,
      word_start_table=word_start_table, strategy=strategy_from_config(config), ids=ids)
