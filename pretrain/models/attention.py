"""Attention for packed rows: the segment and sliding-window masks, rotary positions, attention.

The segment mask is block-diagonal over packed documents; padding (segment 0) attends only to
padding, so no softmax row is ever empty. The sliding window (ModernBERT's local attention) keeps
|p_i - p_j| <= local_window // 2 on top of it, where p are the per-document positions: within a
document that is ModernBERT's distance between row indices, a window never crosses a document,
and every token still sees itself; padding sees all padding (its positions are all 0, the
pipeline's). Both are kept by structure, as a `PackedMask` (segment ids,
positions, window): its `dense()` is the boolean [B, 1, L, L] (query, key) mask that `xla` and
`cudnn` read, while the flash kernels (``attention_kernels``, chosen by `EncoderConfig.attention`)
take the segment ids and the window radius and never build it. Any other boolean [B, 1, L, L]
mask (ERNIE-Gram's, RetroMAE's decoder) is accepted too and always runs densely.

Rotary embeddings are Hugging Face's (``rotate_half`` layout, inverse frequencies
theta^(-2k/D), computed in float32) applied at the per-document positions, so they restart in
each packed document like learned positions do.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from pretrain.models import attention_kernels, layers
from pretrain.models.encoder_config import EncoderConfig

Array = jax.Array
_QKV = ("batch", "length", "heads", "kv")


@flax.struct.dataclass
class PackedMask:
  """The mask of packed rows by structure: query i may attend key j iff their segment ids are
  equal and, with a window, |p_i - p_j| <= window // 2 (p: `positions_BL`) or both are padding."""

  segment_ids_BL: Array
  positions_BL: Optional[Array] = None
  window: int = flax.struct.field(pytree_node=False, default=0)  # 0: no window

  @property
  def radius(self) -> Optional[int]:
    """The window's reach in rows (kernels compare row indices), or None without a window."""
    return self.window // 2 if self.window else None

  def dense(self) -> Array:
    """The [B, 1, L, L] boolean mask."""
    ids_BL = self.segment_ids_BL
    mask_B1LL = ids_BL[:, None, :, None] == ids_BL[:, None, None, :]
    if not self.window:
      return mask_B1LL
    padding_B11L = (ids_BL == 0)[:, None, None, :]  # segment 0 with segment 0 only (see above)
    return _within_window(mask_B1LL, self.positions_BL, self.window) | (mask_B1LL & padding_B11L)


Mask = Union[PackedMask, Array]  # A structural mask, or any boolean [B, 1, L, L] mask.


def _within_window(mask_B1LL: Array, positions_BL: Array, window: int) -> Array:
  distance_BLL = jnp.abs(positions_BL[:, :, None] - positions_BL[:, None, :])
  return mask_B1LL & (distance_BLL <= window // 2)[:, None]


def segment_mask(segment_ids_BL: Array) -> PackedMask:
  """Query i may attend key j iff their segment ids are equal (`.dense()`: [B, 1, L, L])."""
  return PackedMask(jnp.asarray(segment_ids_BL))


def window_mask(mask: Mask, positions_BL: Array, window: int) -> Mask:
  """`mask` restricted to keys within window // 2 positions of the query (structural when
  `mask` is a `segment_mask`, a dense array when it is one)."""
  if isinstance(mask, PackedMask):
    return mask.replace(positions_BL=jnp.asarray(positions_BL), window=window)
  return _within_window(mask, positions_BL, window)


def dense(mask: Mask) -> Array:
  """The boolean [B, 1, L, L] array of either kind of mask."""
  return mask.dense() if isinstance(mask, PackedMask) else mask


def attend(config: EncoderConfig, q_BLND: Array, k_BLND: Array, v_BLND: Array,
           mask: Mask) -> Array:
  """softmax(q k^T / sqrt(D)) v under `mask`, by `config.attention` (`attention_kernels`).

  Start-up validation checks the kernel against the run's `data.seq_len`. Other lengths reach
  the encoder too: probe batches of any width, contrastive queries of `objective.query_len`.
  A kernel is a speed choice with the same outputs, so a length it cannot run goes to XLA.
  """
  _, seq_len, _, head_dim = q_BLND.shape
  backend = jax.default_backend()
  name = attention_kernels.resolve(config.attention, backend, head_dim, seq_len, config.dtype,
                                   config.attention_interpret, fallback="xla")
  if (name in attention_kernels.KERNELS and isinstance(mask, PackedMask)
      and k_BLND.shape[1] == seq_len):
    kernel = functools.partial(getattr(attention_kernels, name), radius=mask.radius,
                               interpret=config.attention_interpret)
    return attention_kernels.per_shard(kernel, q_BLND, k_BLND, v_BLND, mask.segment_ids_BL)
  if name == "cudnn":
    return attention_kernels.cudnn(q_BLND, k_BLND, v_BLND, dense(mask))
  return jax.nn.dot_product_attention(q_BLND, k_BLND, v_BLND, mask=dense(mask))


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
  `mask_B1LL` is a `Mask`: a `PackedMask` (the encoder's) or any boolean [B, 1, L, L] array.
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
    # The scale is 1/sqrt(head_dim), as in BERT and ModernBERT.
    out_BLND = attend(cfg, q_BLND, k_BLND, v_BLND, mask_B1LL)
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
