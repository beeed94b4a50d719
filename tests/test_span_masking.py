"""Span masking: length statistics against p(n), the token budget, boundaries, whole-word spans,
per-span corruption, the config keys, and that the token strategy is unchanged."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common, demo
from objectives import masking, mlm
from pretrain.data import tokenizer as tok
from tests.conftest import fake_tokenizer, packed_batch
from objectives import registry

V = 1000
# Jitted once per static setting: eager mode would compile every small op separately.
_select = jax.jit(masking.select_units, static_argnames=("rate", "slots", "strategy"))
_tiling = jax.jit(masking.span_tiling, static_argnames=("span_probs",))


def _mask(rng, ids, config, table=None):
  return jax.jit(lambda r, i: masking.mask_with_config(r, i, config, V, table))(rng, ids)


def _rows(seed, B=256, L=128):
  """Packed-looking rows: [CLS] text [SEP] [CLS] text [SEP] padding (some rows shorter)."""
  ids = np.random.default_rng(seed).integers(5, V, (B, L)).astype(np.int32)
  ids[:, 0], ids[:, 60], ids[:, 61], ids[:, 100] = tok.CLS_ID, tok.SEP_ID, tok.CLS_ID, tok.SEP_ID
  ids[:, 101:] = tok.PAD_ID
  ids[::2, 80:] = tok.PAD_ID
  ids[::2, 79] = tok.SEP_ID
  return jnp.asarray(ids)


def _config(strategy, whole_word=False):
  return ml_collections.ConfigDict(dict(
      mask_rate=0.15, mask_token_rate=0.8, random_token_rate=0.1, whole_word=whole_word,
      masking_strategy=strategy, max_span=3, geometric_p=0.2, geometric_max_span=10))


def _interior_span_lengths(starts, cand, max_n):
  """Lengths of tiling spans that start at least max_n tokens before their run's end: whatever
  length was drawn, such a span was not cut short, so its lengths follow p(n) exactly."""
  lengths = []
  for s_row, c_row in zip(starts, cand):
    run_end = len(c_row)
    for i in range(len(c_row) - 1, -1, -1):   # end (exclusive) of the run holding i
      if not c_row[i]:
        run_end = i
      elif s_row[i] and i + max_n <= run_end:
        nxt = next((j for j in range(i + 1, run_end) if s_row[j]), run_end)
        lengths.append(nxt - i)
  return np.asarray(lengths)


@pytest.mark.parametrize("strategy", ["span", "geometric"])
def test_span_lengths_follow_closed_form(strategy):
  ids = _rows(0)
  cand = masking.candidates(ids)
  probs = masking.span_length_probs(strategy)
  closed = {"span": np.array([6, 3, 2]) / 11,
            "geometric": 0.2 * 0.8 ** np.arange(10) / (1 - 0.8 ** 10)}[strategy]
  np.testing.assert_allclose(probs, closed, rtol=1e-12)
  starts = _tiling(jax.random.key(1), cand, cand, span_probs=tuple(probs))
  lengths = _interior_span_lengths(np.asarray(starts), np.asarray(cand), len(probs))
  freq = np.bincount(lengths, minlength=len(probs) + 1)[1:] / len(lengths)
  assert lengths.max() <= len(probs)
  tolerance = 4 * np.sqrt(probs * (1 - probs) / len(lengths))
  assert np.all(np.abs(freq - probs) < tolerance), (freq, probs, len(lengths))


@pytest.mark.parametrize("strategy", ["span", "geometric"])
def test_spans_fill_the_budget_inside_runs(strategy):
  ids = _rows(2)
  cand = np.asarray(masking.candidates(ids))
  slots = masking.max_predictions(ids.shape[1], 0.15)
  selected, span = _select(jax.random.key(3), ids, rate=0.15, slots=slots,
                           strategy=masking.strategy_from_config(_config(strategy)))
  selected, span = np.asarray(selected), np.asarray(span)
  np.testing.assert_array_equal(selected.sum(-1), np.round(0.15 * cand.sum(-1)))
  assert not (selected & ~cand).any(), "a special token or padding was selected"
  cut_spans = 0
  for r in range(ids.shape[0]):
    for s in np.unique(span[r][selected[r]]):
      members = np.flatnonzero((span[r] == s) & cand[r])
      assert cand[r, members[0]:members[-1] + 1].all(), "a span crosses a special token"
      chosen = selected[r, members]
      # Only a prefix of a span is ever taken, and at most one span per row is cut.
      assert np.all(chosen[:chosen.sum()]), f"row {r}: span at {s} selected with a hole"
      cut_spans += int(0 < chosen.sum() < len(members))
  assert cut_spans <= ids.shape[0]


def test_selected_spans_have_the_tiling_lengths():
  """Spans are picked uniformly among the tiles, so complete selected spans follow p(n) too."""
  ids = _rows(4)
  cand = np.asarray(masking.candidates(ids))
  strategy = masking.strategy_from_config(_config("span"))
  selected, span = _select(jax.random.key(5), ids, rate=0.15, slots=20, strategy=strategy)
  selected, span = np.asarray(selected), np.asarray(span)
  lengths = []
  for r in range(ids.shape[0]):
    for s in np.unique(span[r][selected[r]]):
      members = (span[r] == s) & cand[r]
      if selected[r][members].all() and s + 3 < 128 and cand[r, s:s + 3].all():
        lengths.append(members.sum())   # complete, and not near a run's end
  freq = np.bincount(lengths, minlength=4)[1:] / len(lengths)
  probs = np.array(strategy.span_probs)
  # Selection is exactly uniform over tiles, except the per-row budget cut, which favours short
  # spans slightly; a looser band than the tiling test.
  assert np.all(np.abs(freq - probs) < 0.05), (freq, probs)


def test_whole_word_spans_take_complete_words():
  table = np.random.default_rng(0).random(V) < 0.4
  table[:5] = False
  ids = _rows(6)
  starts = np.asarray(masking.word_starts(ids, table))
  cand = np.asarray(masking.candidates(ids))
  strategy = masking.strategy_from_config(_config("geometric", whole_word=True))
  selected, _ = _select(jax.random.key(7), ids, rate=0.15, slots=20, word_start_table=table,
                        strategy=strategy)
  selected = np.asarray(selected)
  word = np.maximum.accumulate(np.where(starts, np.arange(ids.shape[1]), 0), axis=1)
  for r in range(ids.shape[0]):
    for w in np.unique(word[r][selected[r]]):
      assert selected[r][(word[r] == w) & cand[r]].all(), f"row {r}: word {w} partly selected"
  assert np.all(selected.sum(-1) <= np.round(0.15 * cand.sum(-1)))
  assert 0.10 < selected.sum() / cand.sum() <= 0.15


def test_geometric_corrupts_whole_spans_alike():
  ids = _rows(8)
  config = _config("geometric")
  m = _mask(jax.random.key(9), ids, config)
  select_rng = jax.random.split(jax.random.key(9))[0]   # as mask_tokens splits it
  selected, span = _select(select_rng, ids, rate=0.15, slots=20,
                           strategy=masking.strategy_from_config(config))
  is_mask = np.asarray(m.input_ids) == tok.MASK_ID
  selected, span = np.asarray(selected), np.asarray(span)
  np.testing.assert_array_equal(is_mask & ~selected, False)
  mixed = sum(len(set(is_mask[r][selected[r] & (span[r] == s)]))
              > 1 for r in range(ids.shape[0]) for s in np.unique(span[r][selected[r]]))
  assert mixed == 0, f"{mixed} spans were partly [MASK]"
  assert 0.7 < is_mask[selected].mean() < 0.9
  # Megatron's span masking decides per token: spans of 2+ tokens come out mixed.
  m = _mask(jax.random.key(9), ids, _config("span"))
  selected, span = _select(select_rng, ids, rate=0.15, slots=20,
                           strategy=masking.strategy_from_config(_config("span")))
  is_mask, selected, span = (np.asarray(x) for x in (m.input_ids == tok.MASK_ID, selected, span))
  assert any(len(set(is_mask[r][selected[r] & (span[r] == s)])) > 1
             for r in range(ids.shape[0]) for s in np.unique(span[r][selected[r]]))


def _reference_mask(rng, ids, table):
  """mask_tokens as it was before span masking existed: select, gather, corrupt."""
  select_rng, corrupt_rng = jax.random.split(rng)
  slots = masking.max_predictions(ids.shape[1], 0.15)
  starts = None if table is None else masking.word_starts(ids, table)
  selected = masking.select(select_rng, masking.candidates(ids), 0.15, slots, starts)
  positions, weights = masking.gather_selected(selected, slots)
  corrupted = masking.corrupt(corrupt_rng, ids, selected, V, 0.8, 0.1)
  return masking.Masked(corrupted, positions, jnp.take_along_axis(ids, positions, 1), weights)


def test_token_and_whole_word_strategies_are_unchanged():
  """The strategy keys must not move existing masks (the MLM golden values depend on them)."""
  ids = _rows(10, B=16)
  table = fake_tokenizer(V).word_start_table()
  cases = (("token", False), ("token", True), ("whole_word", True))

  def both(rng, ids):
    return [(masking.mask_with_config(rng, ids, _config(s, w), V, table if w else None),
             _reference_mask(rng, ids, table if w else None)) for s, w in cases]

  for (got, want), case in zip(jax.jit(both)(jax.random.key(11), ids), cases):
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b, err_msg=str(case))


@pytest.mark.parametrize("name", ["mlm", "slm"])
def test_objectives_mask_spans_through_the_config(name):
  config = demo.get_config(f"size=tiny,vocab_size=500,seq_len=32,objective={name}")
  batch = packed_batch(np.random.default_rng(0), 64, 32, 500)
  adjacent = {}
  for strategy in ("token", "span"):
    config.objective.masking_strategy = strategy
    objective = registry.build(common.validate(config), fake_tokenizer(500))
    assert isinstance(objective, mlm.MaskedLM)
    masked = jax.jit(objective.mask)(jax.random.key(0), jnp.asarray(batch["input_ids"]))
    w = np.asarray(masked.weights) > 0
    pos = np.sort(np.where(w, np.asarray(masked.positions), -10), 1)
    adjacent[strategy] = (np.diff(pos, axis=1) == 1).sum() / w.sum()
  # Independent 15% tokens neighbour each other about 15% of the time; spans of mean length
  # 18/11 alone give 1 - 11/18 = 39%.
  assert adjacent["token"] < 0.25 and adjacent["span"] > 0.35, adjacent


@pytest.mark.parametrize("name", ["mlm", "rts", "electra"])
def test_whole_word_strategy_loads_the_word_start_table_by_itself(name):
  config = demo.get_config(f"size=tiny,vocab_size=500,seq_len=32,objective={name}")
  config.objective.masking_strategy = "whole_word"
  objective = registry.build(common.validate(config), fake_tokenizer(500))
  assert objective.word_start_table is not None


@pytest.mark.parametrize("key,value,message", [
    ("masking_strategy", "ngram", "allowed: token, whole_word, span, geometric"),
    ("max_span", 0, "an int in \\[1, data.seq_len\\]"),
    ("geometric_p", 0.0, "0 < p <= 1"),
])
def test_bad_masking_config_names_the_key(key, value, message):
  config = demo.get_config("size=tiny")
  config.objective[key] = value
  with pytest.raises(ValueError, match=message):
    common.validate(config)
