"""Masking statistics against their closed-form values, and the whole-word rule."""
import jax
import jax.numpy as jnp
import numpy as np

from objectives import masking
from pretrain.data import tokenizer as tok

V = 1000


def _rows(rng, B=64, L=128):
  """Packed-looking rows: [CLS] text [SEP] [CLS] text [SEP] padding."""
  ids = np.array(jax.random.randint(rng, (B, L), 5, V))
  ids[:, 0] = tok.CLS_ID
  ids[:, 60] = tok.SEP_ID
  ids[:, 61] = tok.CLS_ID
  ids[:, 100] = tok.SEP_ID
  ids[:, 101:] = tok.PAD_ID
  ids[::2, 80:] = tok.PAD_ID      # Some rows are shorter.
  ids[::2, 79] = tok.SEP_ID
  return jnp.asarray(ids)


def test_selects_rounded_rate_of_ordinary_tokens_per_row():
  ids = _rows(jax.random.key(0))
  cand = masking.candidates(ids)
  slots = masking.max_predictions(ids.shape[1], 0.15)
  selected = masking.select(jax.random.key(1), cand, 0.15, slots)
  n = np.asarray(cand.sum(-1))
  np.testing.assert_array_equal(np.asarray(selected.sum(-1)), np.round(0.15 * n))
  assert not np.any(np.asarray(selected & ~cand)), "special tokens or padding were selected"


def test_80_10_10_split_matches_closed_form():
  ids = _rows(jax.random.key(2), B=512)
  m = masking.mask_tokens(jax.random.key(3), ids, vocab_size=V)
  w = np.asarray(m.weights) > 0
  orig = np.asarray(m.targets)[w]
  now = np.take_along_axis(np.asarray(m.input_ids), np.asarray(m.positions), 1)[w]
  n = orig.size
  frac_mask = np.mean(now == tok.MASK_ID)
  frac_same = np.mean(now == orig)
  frac_random = 1 - frac_mask - frac_same
  # A random replacement equals the original with probability 1/(V-5): "same" is 0.1 + 0.1/995.
  for got, want in ((frac_mask, 0.8), (frac_same, 0.1 + 0.1 / (V - 5)), (frac_random, 0.1 - 0.1 / (V - 5))):
    assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / n), (got, want, n)
  # Unselected positions are untouched.
  untouched = np.ones(ids.shape, bool)
  np.put_along_axis(untouched, np.asarray(m.positions), ~w, 1)
  sel = np.zeros(ids.shape, bool)
  np.put_along_axis(sel, np.asarray(m.positions), w, 1)
  np.testing.assert_array_equal(np.asarray(m.input_ids)[~sel], np.asarray(ids)[~sel])


def test_new_mask_every_step_and_reproducible():
  ids = _rows(jax.random.key(4))
  a = masking.mask_tokens(jax.random.key(5), ids, vocab_size=V)
  b = masking.mask_tokens(jax.random.key(5), ids, vocab_size=V)
  c = masking.mask_tokens(jax.random.key(6), ids, vocab_size=V)
  np.testing.assert_array_equal(a.positions, b.positions)
  assert not np.array_equal(a.positions, c.positions)


def test_whole_word_selection_takes_complete_words():
  rng = np.random.default_rng(0)
  table = rng.random(V) < 0.4          # 40% of pieces start a word
  table[:5] = False
  ids = _rows(jax.random.key(7), B=256)
  starts = np.asarray(masking.word_starts(ids, table))
  cand = np.asarray(masking.candidates(ids))
  slots = masking.max_predictions(ids.shape[1], 0.15)
  selected = np.asarray(masking.select(jax.random.key(8), jnp.asarray(cand), 0.15, slots,
                                       jnp.asarray(starts)))
  word = np.maximum.accumulate(np.where(starts, np.arange(ids.shape[1]), 0), axis=1)
  for r in range(ids.shape[0]):
    for w in np.unique(word[r][selected[r]]):
      members = (word[r] == w) & cand[r]
      assert selected[r][members].all(), f"row {r}: word at {w} only partly selected"
  budget = np.round(0.15 * cand.sum(-1))
  assert np.all(selected.sum(-1) <= budget)
  rate = selected.sum() / cand.sum()
  assert 0.10 < rate <= 0.15, rate


def test_word_starts_follow_specials():
  table = np.zeros(V, bool)
  ids = jnp.asarray([[tok.CLS_ID, 10, 11, tok.SEP_ID, tok.CLS_ID, 12, tok.SEP_ID, 0]])
  starts = np.asarray(masking.word_starts(ids, table))
  assert starts[0, 1] and starts[0, 5] and not starts[0, 2]
