"""Attention for packed rows: the segment and sliding-window masks, rotary positions, attention.

Masks are boolean [B, 1, L, L] (query, key). The segment mask is block-diagonal over packed
documents; padding (segment 0) attends only to padding, so no softmax row is ever empty. The
sliding window (ModernBERT's local attention) keeps |p_i - p_j| <= local_window // 2 on top of
it, where p are the per-document positions: within a document that is ModernBERT's distance
between row indices, a window never crosses a document, and every token still sees itself.

Rotary embeddings are Hugging Face's (``rotate_half`` layout, inverse frequencies
theta^(-2k/D), computed in float32) applied at the per-document positions, so they restart in
each packed document like learned positions do.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pretrain.models import layers
from pretrain.models.encoder_config import EncoderConfig

Array = jax.Array
_QKV = ("batch", "length", "heads", "kv")


def segment_mask(segment_ids_BL: Array) -> Array:
  """[B, 1, L, L] boolean: query i may attend key j iff their segment ids are equal."""
  return (segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :])


def window_mask(mask_B1LL: Array, positions_BL: Array, window: int) -> Array:
  """`mask_B1LL` restricted to keys within window // 2 positions of the query."""
  distance_BLL = jnp.abs(positions_BL[:, :, None] - positions_BL[:, None, :])
  return mask_B1LL & (distance_BLL <= window // 2)[:, None]


def rotary(x_BLND: Array, positions_BL: Array, theta: float) -> Array:
  """Rotary position embedding of queries or keys [B, L, N, D] at `positions_BL`."""
  d = x_BLND.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  freqs_BLK = positions_BL[..., None].astype(jnp.float32) * inv_freq
  angles_BL1D = jnp.concatenate([freqs_BLK, freqs_BLK], -1)[:, :, None, :]
  x = x_BLND.astype(jnp.float32)
  rotated = jnp.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
  return (x * jnp.cos(angles_BL1D) + rotated * jnp.sin(angles_BL1D)).astype(x_BLND.dtype)


class Attention(nn.Module):
  """Multi-head attention of `query_BLH` over `kv_BLH` (the same array for self-attention),
  output projection and hidden dropout; post-LN (BERT) also adds the residual and applies the
  norm (attention/LayerNorm), pre-norm returns the sub-block's output for the caller's residual.

  Params: {query,key,value}/{kernel [H, N, D], bias [N, D]}, output/{kernel [N, D, H], bias [H]}.
  With position="rope", queries and keys are rotated at `positions_BL` with base `theta`.
  Attention-probability dropout is NOT applied (``jax.nn.dot_product_attention`` has none, and it
  keeps fused kernels usable); the exports therefore declare an attention dropout of 0.0.
  """

  config: EncoderConfig
  theta: float = 10000.0

  @nn.compact
  def __call__(self, query_BLH, kv_BLH, mask_B1LL, positions_BL: Optional[Array] = None, *,
               deterministic: bool):
    cfg = self.config

    def project(name, x_BLH):
      y = layers.Einsum(cfg, "blh,hnd->blnd", (cfg.hidden_size, cfg.num_heads, cfg.head_dim),
                        ("embed", "heads", "kv"), name=name)(x_BLH)
      return nn.with_logical_constraint(y, _QKV)

    q_BLND, k_BLND = project("query", query_BLH), project("key", kv_BLH)
    v_BLND = project("value", kv_BLH)
    if cfg.position == "rope":
      if positions_BL is None:
        raise ValueError("position='rope' attention needs positions_BL")
      q_BLND = rotary(q_BLND, positions_BL, self.theta)
      k_BLND = rotary(k_BLND, positions_BL, self.theta)
    # Default scale is 1/sqrt(head_dim), as in BERT and ModernBERT.
    out_BLND = jax.nn.dot_product_attention(q_BLND, k_BLND, v_BLND, mask=mask_B1LL)
    out_BLND = nn.with_logical_constraint(out_BLND, _QKV)
    out_BLH = layers.Einsum(cfg, "blnd,ndh->blh", (cfg.num_heads, cfg.head_dim, cfg.hidden_size),
                            ("heads", "kv", "embed"), name="output")(out_BLND)
    out_BLH = nn.Dropout(cfg.dropout_rate)(out_BLH, deterministic=deterministic)
    if cfg.pre_norm:
      return layers.constrain(out_BLH)
    return layers.constrain(layers.norm(cfg, "LayerNorm")(out_BLH + query_BLH))


def layer_theta(config: EncoderConfig, layer: int) -> float:
  """The rotary base of `layer`: rope_theta when it is global, rope_local_theta when local."""
  return config.rope_theta if config.is_global(layer) else config.rope_local_theta
