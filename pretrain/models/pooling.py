"""Parameter-free pooling of token states [B, L, H] into one vector [B, H] per row, and L2
normalisation: what fine-tuning heads, retrieval, the sentence-transformers export and the
contrastive poolers (`pretrain.models.poolers`) share.

- ``cls``: the first token's final state (BERT, RetroMAE, ORQA/ICT).
- ``mean``: the mean over the row's tokens, [CLS] and [SEP] included (Contriever,
  sentence-transformers' mean pooling).
- ``max``: the largest value of each feature over the row's tokens (sentence-transformers'
  max pooling, InferSent). One token can set a feature, so a local anomaly (a one-token bug in a
  whole function) is not averaged away as in the mean.

A mean's denominator floor only matters for a row without tokens (whose sum is 0, so any positive
floor gives 0), hence one floor for every caller; `l2_normalize`'s floor is
torch.nn.functional.normalize's (1e-12) unless a caller says otherwise.
"""
from __future__ import annotations

import jax.numpy as jnp

MODES = ("cls", "mean", "max")


def check(mode: str, what: str = "pooling") -> str:
  """`mode` if it is one of MODES; otherwise an error naming `what` is being chosen."""
  if mode not in MODES:
    raise ValueError(f"Unknown {what} {mode!r}; allowed: {', '.join(MODES)}.")
  return mode


def mean(hidden_BLH, mask_BL):
  """[B, H] mean of the states where `mask_BL` is nonzero (segment ids will do), in their dtype."""
  mask_BL1 = (mask_BL[..., None] > 0).astype(hidden_BLH.dtype)
  return jnp.sum(hidden_BLH * mask_BL1, 1) / jnp.maximum(jnp.sum(mask_BL1, 1), 1e-9)


# Padding's value under max pooling: sentence-transformers' fill, so a row's maximum is over its
# tokens only (and a row without tokens gives this value, as there).
MAX_FILL = -1e9


def max_over_tokens(hidden_BLH, mask_BL):
  """[B, H] feature-wise maximum over the states where `mask_BL` is nonzero."""
  return jnp.max(jnp.where(mask_BL[..., None] > 0, hidden_BLH,
                           jnp.asarray(MAX_FILL, hidden_BLH.dtype)), axis=1)


def pool(hidden_BLH, mask_BL, mode):
  """[B, H]: the first ([CLS]) state, or the `mean` or `max` over `mask_BL` (nonzero = token)."""
  mode = check(mode)
  if mode == "cls":
    return hidden_BLH[:, 0]
  if mode == "max":
    return max_over_tokens(hidden_BLH, mask_BL)
  return mean(hidden_BLH, mask_BL)


def l2_normalize(x, eps=1e-12, xp=jnp):
  """x / max(|x|, eps) over the last axis, as torch.nn.functional.normalize; `xp=np` keeps numpy
  arrays (and float64) in numpy."""
  return x / xp.maximum(xp.linalg.norm(x, axis=-1, keepdims=True), eps)
