"""Poolers: token states [B, L, H] -> one embedding [B, D] per row, for contrastive objectives.

- ``cls``, ``mean`` and ``max``: `pretrain.models.pooling`'s, over the row's non-padding tokens.
- ``latent``: NV-Embed's latent attention (Lee et al., 2024, official ``LatentAttentionModel``):
  every token state queries ``num_latents`` trainable latents that act as keys and values
  (multi-head cross-attention, pre-LayerNorm on both sides, no biases), residual, then a pre-LN
  GEGLU feed-forward (x4), residual, then the mean over tokens. Our choice: the attention's inner
  width is H (NV-Embed: heads x 4096), so its cost stays that of one encoder layer.
- ``multilayer``: multi-layer trainable pooling (Tang & Yang, 2024, for decoder LLMs): one summary
  per encoder layer (embeddings output included) plus a trainable layer-position embedding; the
  ``num_latents`` trainable latents query these L+1 summaries (cross-attention, pre-LN), GEGLU
  feed-forward, mean over latents. Our choice for an encoder: a layer's summary is its mean over
  tokens (the LLM version takes the last token's state).

Then optionally a dense projection to ``projection_dim`` (ICT/ORQA: 128, followed by LayerNorm)
and L2 normalisation (cosine similarity). Every parameter carries logical axis names.

A pooled row needs at least one non-padding token; an all-padding row (the padding batches of an
evaluation) gets a finite embedding that callers must mask out.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp

from pretrain.models import layers, pooling

KINDS = pooling.MODES + ("latent", "multilayer")
CONFIG_FILE = "pooler.json"
PARAMS_FILE = "pooler_params.msgpack"


@dataclasses.dataclass(frozen=True)
class PoolerConfig:
  kind: str = "mean"
  hidden_size: int = 256
  num_layers: int = 4           # encoder layers; multilayer pools num_layers + 1 states
  num_latents: int = 512        # latent and multilayer: trainable latents (NV-Embed: 512)
  num_heads: int = 8            # latent and multilayer: cross-attention heads (NV-Embed: 8)
  mlp_ratio: int = 4            # GEGLU feed-forward width / hidden_size (NV-Embed: 4)
  projection_dim: int = 0       # 0: no projection
  projection_layer_norm: bool = False
  normalize: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Unknown pooler {self.kind!r}; allowed: {', '.join(KINDS)}.")
    if self.kind in ("latent", "multilayer") and self.hidden_size % self.num_heads:
      raise ValueError(f"pooler heads ({self.num_heads}) must divide the hidden size "
                       f"({self.hidden_size}); set objective.pooler_heads to a divisor.")

  @property
  def output_dim(self) -> int:
    return self.projection_dim or self.hidden_size

  @property
  def needs_all_layers(self) -> bool:
    return self.kind == "multilayer"


def masked_mean(x_BLH, segment_ids_BL):
  """float32 mean over the row's non-padding tokens; 0 for a row without any."""
  return pooling.mean(x_BLH.astype(jnp.float32), segment_ids_BL)


def l2_normalize(x_BD, eps=1e-12):
  """float32 rows of unit norm (a zero row stays zero). One rsqrt instead of pooling's divide by
  the norm: the contrastive objectives' checkpoints and goldens were trained with this form."""
  x = x_BD.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps))


def _dense(cfg, features, axes, name, use_bias=True):
  init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
  return nn.Dense(features, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype), kernel_init=init,
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
                  name=name)


def _layer_norm(name):
  return nn.LayerNorm(
      epsilon=1e-5, use_fast_variance=False, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)))


class CrossAttention(nn.Module):
  """Pre-LN multi-head cross-attention without biases (NV-Embed's ``PreNorm(Attention)``)."""

  config: PoolerConfig

  @nn.compact
  def __call__(self, x_BQH, context_BKH):
    cfg = self.config
    h, n = cfg.hidden_size, cfg.num_heads
    q = _dense(cfg, h, ("embed", "mlp"), "query", False)(_layer_norm("norm")(x_BQH))
    context = _layer_norm("norm_context")(context_BKH)
    k = _dense(cfg, h, ("embed", "mlp"), "key", False)(context)
    v = _dense(cfg, h, ("embed", "mlp"), "value", False)(context)
    split = lambda t: t.reshape(*t.shape[:-1], n, h // n)  # noqa: E731
    out = jax.nn.dot_product_attention(split(q), split(k), split(v))
    out = out.reshape(*out.shape[:-2], h)
    return _dense(cfg, h, ("mlp", "embed"), "output", False)(out)


class GegluFeedForward(nn.Module):
  """Pre-LN dense(2 x ratio x H) -> GEGLU -> dense(H) (NV-Embed's ``PreNorm(FeedForward)``)."""

  config: PoolerConfig

  @nn.compact
  def __call__(self, x_BQH):
    cfg = self.config
    width = cfg.mlp_ratio * cfg.hidden_size
    y = _dense(cfg, 2 * width, ("embed", "mlp"), "dense_in")(_layer_norm("norm")(x_BQH))
    y, gate = jnp.split(y, 2, axis=-1)
    y = y * layers.gelu(gate)
    return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "dense_out")(y)


def _latents(module, cfg):
  init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed"))
  return module.param("latents", init, (cfg.num_latents, cfg.hidden_size))


class Pooler(nn.Module):
  """hidden states -> [B, output_dim] float32 embeddings; see the module docstring."""

  config: PoolerConfig

  @nn.compact
  def __call__(self, hidden_BLH, segment_ids_BL, all_layers: Optional[Sequence] = None):
    """`hidden_BLH`: the states to pool; `all_layers`: every layer's states (multilayer only)."""
    cfg = self.config
    if cfg.kind in pooling.MODES:
      x_BH = pooling.pool(hidden_BLH.astype(jnp.float32), segment_ids_BL, cfg.kind)
    elif cfg.kind == "latent":
      latents = jnp.broadcast_to(_latents(self, cfg), (hidden_BLH.shape[0], cfg.num_latents,
                                                       cfg.hidden_size))
      x = hidden_BLH + CrossAttention(cfg, name="attention")(hidden_BLH, latents)
      x = x + GegluFeedForward(cfg, name="feed_forward")(x)
      x_BH = masked_mean(x, segment_ids_BL)
    else:
      if all_layers is None or len(all_layers) != cfg.num_layers + 1:
        raise ValueError(f"The multilayer pooler needs all {cfg.num_layers + 1} layer outputs "
                         f"(Encoder(..., return_all_layers=True)).")
      summary_BNH = jnp.stack([masked_mean(h, segment_ids_BL) for h in all_layers], axis=1)
      layer_pos = self.param(
          "layer_position", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                         (None, "embed")),
          (cfg.num_layers + 1, cfg.hidden_size))
      summary_BNH = summary_BNH + layer_pos
      latents = jnp.broadcast_to(_latents(self, cfg), (hidden_BLH.shape[0], cfg.num_latents,
                                                       cfg.hidden_size))
      x = latents + CrossAttention(cfg, name="attention")(latents, summary_BNH)
      x = x + GegluFeedForward(cfg, name="feed_forward")(x)
      x_BH = x.mean(axis=1)
    if cfg.projection_dim:
      x_BH = _dense(cfg, cfg.projection_dim, ("embed", "mlp"), "projection")(x_BH)
      if cfg.projection_layer_norm:
        x_BH = nn.LayerNorm(
            epsilon=1e-5, use_fast_variance=False, name="projection_norm",
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("mlp",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)))(x_BH)
    x_BH = x_BH.astype(jnp.float32)
    return l2_normalize(x_BH) if cfg.normalize else x_BH


def init_params(pooler: Pooler, rng, batch_size=1, length=2):
  """Boxed pooler params (an empty dict for cls/mean without projection)."""
  cfg = pooler.config
  hidden = jnp.zeros((batch_size, length, cfg.hidden_size))
  seg = jnp.ones((batch_size, length), jnp.int32)
  layers = (hidden,) * (cfg.num_layers + 1)
  return pooler.init(rng, hidden, seg, layers).get("params", {})


def save(out_dir, config: PoolerConfig, params) -> None:
  """pooler.json (the PoolerConfig) + pooler_params.msgpack next to an export."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(dataclasses.asdict(config), f, indent=2)
    f.write("\n")
  with open(os.path.join(out_dir, PARAMS_FILE), "wb") as f:
    f.write(flax.serialization.msgpack_serialize(nn.unbox(params or {})))


def load(model_dir) -> tuple[PoolerConfig, dict] | None:
  """(PoolerConfig, params) saved by `save`, or None when the directory has no pooler.json."""
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    config = PoolerConfig(**json.load(f))
  params = {}
  params_path = os.path.join(model_dir, PARAMS_FILE)
  if os.path.isfile(params_path):
    with open(params_path, "rb") as f:
      params = flax.serialization.msgpack_restore(f.read())
  return config, params


def embed(config: PoolerConfig, params, layers, segment_ids_BL):
  """Embeddings [B, D] from every layer's states (a tuple, as `return_all_layers` gives)."""
  return Pooler(config).apply({"params": params}, layers[-1], segment_ids_BL, layers)
