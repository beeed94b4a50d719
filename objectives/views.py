"""Contriever's two views of one chunk, made on device inside the jitted step.

Contriever (Izacard et al., 2022, official `src/data.py`): from a chunk of tokens, two independent
random crops, each of length int(n * ratio) with ratio ~ U(ratio_min, ratio_max) and a uniformly
random start; then token deletion (each token dropped with probability p); then [CLS] ... [SEP]
are added back. Here a row is one chunk "[CLS] t_1 ... t_n [SEP]" followed by padding (what
`pretrain.data.pairs` yields for view="crop"); the [CLS]/[SEP] ids are read from the row itself,
so any tokenizer works. Each view is compacted to the front of a row of
`crop_length(L, ratio_max)` tokens; a crop keeps at least one token before deletion.

The randomness comes from the step's rng (folded with the step in the train step), so a resumed
run crops exactly as an uninterrupted one.
"""
import math

import jax
import jax.numpy as jnp


def crop_length(seq_len, ratio_max):
  """Row length that holds any crop of a `seq_len` chunk, [CLS] and [SEP] included."""
  body = seq_len - 2
  return min(seq_len, max(1, int(math.floor(body * ratio_max))) + 2)


def _crop_row(rng, ids_L, n, ratio_min, ratio_max, deletion, out_len):
  """One view of one row: ([out_len] ids, [out_len] segment ids, [out_len] positions)."""
  ratio_rng, start_rng, delete_rng = jax.random.split(rng, 3)
  ratio = jax.random.uniform(ratio_rng, (), minval=ratio_min, maxval=ratio_max)
  length = jnp.clip(jnp.floor(n * ratio).astype(jnp.int32), 1, jnp.maximum(n, 1))
  start = jax.random.randint(start_rng, (), 0, jnp.maximum(n - length, 0) + 1)
  j = jnp.arange(ids_L.shape[0]) - 1  # body index of each position ([CLS] is -1)
  keep = (j >= start) & (j < start + length) & (j < n)
  keep &= jax.random.uniform(delete_rng, ids_L.shape) >= deletion
  keep = keep & (n > 0)
  # Kept tokens go to 1, 2, ... in order; the rest to out_len (dropped by the scatter).
  dest = jnp.where(keep, jnp.cumsum(keep), out_len)
  body = jnp.zeros((out_len,), ids_L.dtype).at[dest].set(ids_L, mode="drop")
  count = jnp.minimum(keep.sum(), out_len - 2)
  k = jnp.arange(out_len)
  out = jnp.where(k == 0, ids_L[0], body)
  out = jnp.where(k == count + 1, ids_L[n + 1], out)
  out = jnp.where(k > count + 1, 0, out)
  seg = (k <= count + 1).astype(jnp.int32)
  return out, seg, jnp.where(seg > 0, k, 0).astype(jnp.int32)


def random_crops(rng, input_ids_BL, segment_ids_BL, *, ratio_min, ratio_max, deletion):
  """One Contriever view of every row: dict of [B, crop_length(L)] ids, segment ids, positions.

  An all-padding row (evaluation padding) gives an all-padding view.
  """
  batch, seq_len = input_ids_BL.shape
  out_len = crop_length(seq_len, ratio_max)
  n_B = jnp.maximum((segment_ids_BL > 0).sum(-1) - 2, 0)
  rngs = jax.random.split(rng, batch)
  ids, seg, pos = jax.vmap(_crop_row, in_axes=(0, 0, 0, None, None, None, None))(
      rngs, input_ids_BL, n_B, ratio_min, ratio_max, deletion, out_len)
  empty_B1 = (segment_ids_BL[:, :1] == 0)
  return {"input_ids": jnp.where(empty_B1, 0, ids), "segment_ids": jnp.where(empty_B1, 0, seg),
          "positions": jnp.where(empty_B1, 0, pos)}


def two_views(rng, batch, *, ratio_min, ratio_max, deletion):
  """Two independent views (query, document) of each chunk row of `batch`."""
  q_rng, d_rng = jax.random.split(rng)
  kwargs = dict(ratio_min=ratio_min, ratio_max=ratio_max, deletion=deletion)
  return (random_crops(q_rng, batch["input_ids"], batch["segment_ids"], **kwargs),
          random_crops(d_rng, batch["input_ids"], batch["segment_ids"], **kwargs))
