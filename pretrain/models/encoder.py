"""A BERT-compatible Transformer encoder for packed sequences, plus the MLM head.

The math is exactly Hugging Face ``BertModel`` / ``BertForMaskedLM`` (post-LN,
learned absolute positions, token-type embeddings, exact erf GELU) so that
``pretrain.interop.hf_bert`` can export weights that reproduce our outputs in PyTorch.

Sequences are packed: several documents share a row. ``segment_ids`` is 0 on
padding and 1, 2, 3, ... per document, and positions restart at 0 for each
document. Attention is block-diagonal over segments; padding attends only to
padding, so no softmax row is ever fully masked (no NaNs).

Every parameter carries T5X-style logical axis names ("vocab", "embed",
"heads", "kv", "mlp") so the training code can shard it with axis rules.

ELECTRA additions: an optional ``embedding_size`` different from ``hidden_size``
(embeddings are projected by ``embeddings_project``, as in HF ``ElectraModel``),
and ``Encoder(...)(..., shared_embeddings=...)`` so that a second encoder
(ELECTRA's generator) runs on the embedding arrays of the first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Encoder hyper-parameters; field meanings follow Hugging Face ``BertConfig``."""

  vocab_size: int
  hidden_size: int = 256
  num_layers: int = 4
  num_heads: int = 4
  mlp_dim: int = 1024
  max_len: int = 512  # Number of position embeddings.
  type_vocab_size: int = 2
  dropout_rate: float = 0.1  # Hidden dropout: embeddings, attention output, MLP output.
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: str = "float32"  # Activation / computation dtype, e.g. "bfloat16".
  param_dtype: str = "float32"
  # Width of the token/position/type embeddings (HF ElectraConfig.embedding_size); None means
  # hidden_size. When it differs from hidden_size, a dense `embeddings_project` maps it across.
  embedding_size: Optional[int] = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
                 "max_len", "type_vocab_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"EncoderConfig.{name} must be a positive int, got {value!r}")
    e = self.embedding_size
    if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e < 1):
      raise ValueError(
          f"EncoderConfig.embedding_size must be None (same as hidden_size) or a positive int, "
          f"got {e!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"EncoderConfig.hidden_size ({self.hidden_size}) must be divisible by "
          f"EncoderConfig.num_heads ({self.num_heads})")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"EncoderConfig.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"EncoderConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
    if not self.initializer_range > 0:
      raise ValueError(
          f"EncoderConfig.initializer_range must be > 0, got {self.initializer_range!r}")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
      except TypeError:
        ok = False
      if not ok:
        raise ValueError(
            f"EncoderConfig.{name} must name a floating dtype such as 'float32' or "
            f"'bfloat16', got {value!r}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def embed_dim(self) -> int:
    """Width of the embedding tables (``embedding_size``, or ``hidden_size`` when None)."""
    return self.hidden_size if self.embedding_size is None else self.embedding_size

  @property
  def projects_embeddings(self) -> bool:
    """Whether ``embeddings_project`` exists (HF creates it iff the two widths differ)."""
    return self.embed_dim != self.hidden_size


def _init(config: EncoderConfig, names):
  """normal(initializer_range) init (BERT's) annotated with logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _zeros(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _layer_norm(config: EncoderConfig, name: str) -> nn.LayerNorm:
  # use_fast_variance=False computes E[(x - mean)^2] like torch, which keeps the
  # export exact even when activations have a large mean.
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps,
      dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype),
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=_zeros(("embed",)),
      name=name)


def _dense(config: EncoderConfig, features: int, axes, name: str) -> nn.Dense:
  return nn.Dense(
      features,
      dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype),
      kernel_init=_init(config, axes),
      bias_init=_zeros(axes[-1:]),
      name=name)


def _constrain(x: Array, last_axis: str = "embed") -> Array:
  """Sharding hint; a no-op unless the caller activated logical axis rules."""
  return nn.with_logical_constraint(x, ("batch", "length", last_axis))


class _Einsum(nn.Module):
  """A dense layer over several axes with its kernel created at its true rank.

  flax's DenseGeneral initialises a flattened 2-D kernel and reshapes it, which breaks the
  logical-axis constraint of a 3-D kernel as soon as a mesh and axis rules are active.
  """

  config: EncoderConfig
  equation: str
  kernel_shape: tuple
  kernel_axes: tuple

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    out_axes = self.kernel_axes[-1:] if self.kernel_axes[-1] == "embed" else self.kernel_axes[1:]
    out_shape = self.kernel_shape[-len(out_axes):]
    kernel = self.param("kernel", _init(cfg, self.kernel_axes), self.kernel_shape, param_dtype)
    bias = self.param("bias", _zeros(out_axes), out_shape, param_dtype)
    return jnp.einsum(self.equation, x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


class Embeddings(nn.Module):
  """Word + position + token-type(0) embeddings (width ``embed_dim``), LayerNorm, dropout."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids_BL, positions_BL, input_embeds_BLH=None, *, deterministic: bool):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def embed(num, axes, name):
      return nn.Embed(num, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype,
                      embedding_init=_init(cfg, axes), name=name)

    word = embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")
    position = embed(cfg.max_len, (None, "embed"), "position_embeddings")
    token_type = embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")

    if input_embeds_BLH is None:
      x_BLH = word(input_ids_BL)
    else:
      # Still create the table so the parameter tree does not depend on the call.
      word.embedding  # pylint: disable=pointless-statement
      x_BLH = input_embeds_BLH.astype(dtype)
    # Token type is always 0 here (no sentence pairs); HF adds the same row.
    x_BLH = x_BLH + token_type.embedding[0].astype(dtype)
    x_BLH = x_BLH + position(positions_BL)
    x_BLH = _layer_norm(cfg, "LayerNorm")(x_BLH)
    x_BLH = nn.Dropout(cfg.dropout_rate)(x_BLH, deterministic=deterministic)
    return _constrain(x_BLH)


class SelfAttention(nn.Module):
  """Multi-head self-attention + output projection + dropout + residual + LayerNorm.

  Attention-probability dropout is NOT applied (``jax.nn.dot_product_attention``
  has none, and it keeps fused kernels usable); the export therefore declares
  ``attention_probs_dropout_prob = 0.0``. Hidden dropout after the output
  projection is applied as in BERT.
  """

  config: EncoderConfig

  @nn.compact
  def __call__(self, x_BLH, mask_B1LL, *, deterministic: bool):
    cfg = self.config

    def project(name):
      return _Einsum(cfg, "blh,hnd->blnd", (cfg.hidden_size, cfg.num_heads, cfg.head_dim),
                     ("embed", "heads", "kv"), name=name)

    qkv_names = ("batch", "length", "heads", "kv")
    q_BLND = nn.with_logical_constraint(project("query")(x_BLH), qkv_names)
    k_BLND = nn.with_logical_constraint(project("key")(x_BLH), qkv_names)
    v_BLND = nn.with_logical_constraint(project("value")(x_BLH), qkv_names)
    # Default scale is 1/sqrt(head_dim), as in BERT.
    out_BLND = jax.nn.dot_product_attention(q_BLND, k_BLND, v_BLND, mask=mask_B1LL)
    out_BLND = nn.with_logical_constraint(out_BLND, qkv_names)
    out_BLH = _Einsum(cfg, "blnd,ndh->blh", (cfg.num_heads, cfg.head_dim, cfg.hidden_size),
                      ("heads", "kv", "embed"), name="output")(out_BLND)
    out_BLH = nn.Dropout(cfg.dropout_rate)(out_BLH, deterministic=deterministic)
    return _constrain(_layer_norm(cfg, "LayerNorm")(out_BLH + x_BLH))


class EncoderLayer(nn.Module):
  """One post-LN BERT block: attention sub-block, then GELU MLP sub-block."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x_BLH, mask_B1LL, *, deterministic: bool):
    cfg = self.config
    x_BLH = SelfAttention(cfg, name="attention")(x_BLH, mask_B1LL, deterministic=deterministic)
    h_BLF = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "intermediate")(x_BLH)
    h_BLF = _constrain(nn.gelu(h_BLF, approximate=False), "mlp")  # HF "gelu" is exact erf.
    h_BLH = _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h_BLF)
    h_BLH = nn.Dropout(cfg.dropout_rate)(h_BLH, deterministic=deterministic)
    return _constrain(_layer_norm(cfg, "LayerNorm")(h_BLH + x_BLH))


def segment_mask(segment_ids_BL: Array) -> Array:
  """[B, 1, L, L] boolean: query i may attend key j iff their segment ids are equal."""
  return (segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :])


class Encoder(nn.Module):
  """BERT encoder over packed rows.

  Parameter tree (maps 1:1 to Hugging Face names, see ``pretrain.interop.hf_bert``)::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/LayerNorm/{scale,bias}
    embeddings_project/{kernel [E,H], bias [H]}   (only when embedding_size != hidden_size)
    layer_{i}/attention/{query,key,value}/{kernel [H,N,D], bias [N,D]}
    layer_{i}/attention/output/{kernel [N,D,H], bias [H]}
    layer_{i}/attention/LayerNorm/{scale,bias}
    layer_{i}/intermediate/{kernel [H,F], bias [F]}
    layer_{i}/output/{kernel [F,H], bias [H]}
    layer_{i}/LayerNorm/{scale,bias}
  """

  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids_BL: Optional[Array], segment_ids_BL: Array,
               positions_BL: Array, *, deterministic: bool = True,
               return_all_layers: bool = False, input_embeds_BLH: Optional[Array] = None,
               shared_embeddings: Any = None, attention_mask_B1LL: Optional[Array] = None):
    """Encodes a packed batch.

    Args:
      input_ids_BL: int token ids; may be None when ``input_embeds_BLH`` is given.
      segment_ids_BL: 0 for padding, 1, 2, ... per packed document.
      positions_BL: position of each token within its document; must be < max_len
        (out-of-range lookups are not checked under jit).
      deterministic: disables dropout; when False a "dropout" rng is required.
      return_all_layers: return (embeddings output, layer_0 output, ...) instead
        of only the final hidden states, like HF ``output_hidden_states``.
      input_embeds_BLH: optional replacement for the word-embedding lookup (like
        HF ``inputs_embeds``, width ``embed_dim``); position and token-type embeddings
        are still added. Useful for gradient/attribution analysis.
      shared_embeddings: params of an ``Embeddings`` module owned by another network
        (ELECTRA's generator runs on the discriminator's tables). When given, this
        encoder has no ``embeddings`` params of its own; gradients flow into the
        given arrays, so one table is trained by both networks. Its ``embed_dim``,
        ``vocab_size``, ``max_len`` and ``type_vocab_size`` must match the owner's.
      attention_mask_B1LL: optional boolean [B, 1, L, L] (query, key) mask used instead of
        the segment mask (ERNIE-Gram's fine-grained prediction slots); every query row must
        allow at least one key.

    Returns:
      [B, L, H] final hidden states in ``config.dtype``, or a tuple of
      num_layers + 1 such arrays when ``return_all_layers``.
    """
    cfg = self.config
    if input_ids_BL is None and input_embeds_BLH is None:
      raise ValueError("Encoder needs input_ids_BL or input_embeds_BLH")
    if shared_embeddings is None:
      x_BLE = Embeddings(cfg, name="embeddings")(
          input_ids_BL, positions_BL, input_embeds_BLH, deterministic=deterministic)
    else:
      # A pure function of the given arrays: they are an input of this module, not its params.
      rngs = None if deterministic else {"dropout": self.make_rng("dropout")}
      x_BLE = Embeddings(cfg, parent=None).apply(
          {"params": shared_embeddings}, input_ids_BL, positions_BL, input_embeds_BLH,
          deterministic=deterministic, rngs=rngs)
    x_BLH = x_BLE
    if cfg.projects_embeddings:
      # Input axis unnamed (replicated): "embed" names the output axis, and one mesh axis may
      # not shard two dimensions of the same array.
      x_BLH = _constrain(_dense(cfg, cfg.hidden_size, (None, "embed"), "embeddings_project")(x_BLE))
    mask_B1LL = (segment_mask(segment_ids_BL) if attention_mask_B1LL is None
                 else attention_mask_B1LL)
    outputs = [x_BLH]
    for i in range(cfg.num_layers):
      x_BLH = EncoderLayer(cfg, name=f"layer_{i}")(x_BLH, mask_B1LL, deterministic=deterministic)
      outputs.append(x_BLH)
    return tuple(outputs) if return_all_layers else x_BLH


class MlmHead(nn.Module):
  """BERT MLM head: dense -> GELU -> LayerNorm -> tied projection + output bias.

  Apply it only to the gathered masked positions (M slots per row, see
  ``gather_positions``), never to all L positions: the [*, V] projection is
  the most expensive matmul in MLM pretraining.

  Parameters: dense/{kernel,bias}, LayerNorm/{scale,bias}, bias [V]. The dense layer maps
  hidden_size -> embed_dim (HF ``ElectraGeneratorPredictions``; equal widths for BERT), so the
  tied projection also works with a narrower (or wider) embedding table.
  """

  config: EncoderConfig

  @nn.compact
  def __call__(self, hidden_BMH: Array, embedding_VH: Array) -> Array:
    """Returns float32 logits [B, M, V] (float32 so the softmax loss is stable)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if embedding_VH.shape != (cfg.vocab_size, cfg.embed_dim):
      raise ValueError(
          f"MlmHead expects the word-embedding table of shape "
          f"({cfg.vocab_size}, {cfg.embed_dim}), got {embedding_VH.shape}")
    x_BME = _dense(cfg, cfg.embed_dim, ("embed", "mlp"), "dense")(hidden_BMH)
    x_BME = nn.gelu(x_BME, approximate=False)
    x_BME = _layer_norm(cfg, "LayerNorm")(x_BME)
    bias_V = self.param("bias", _zeros(("vocab",)), (cfg.vocab_size,),
                        jnp.dtype(cfg.param_dtype))
    logits_BMV = jnp.einsum("bme,ve->bmv", x_BME.astype(dtype), embedding_VH.astype(dtype),
                            preferred_element_type=jnp.float32)
    logits_BMV = add_vocab_bias(logits_BMV, bias_V.astype(jnp.float32))
    return nn.with_logical_constraint(logits_BMV, ("batch", "length", "vocab"))


@jax.custom_vjp
def add_vocab_bias(logits_BMV: Array, bias_V: Array) -> Array:
  """``logits + bias`` whose bias gradient is a matrix-vector product, not a column sum.

  XLA:CPU reduces a [rows, vocab] array over its rows far slower than it multiplies it by a
  vector of ones, and that reduction is the bias gradient of every vocabulary-sized output (the
  README's Performance section has the measurement).
  """
  return logits_BMV + bias_V


def _add_vocab_bias_fwd(logits_BMV, bias_V):
  return logits_BMV + bias_V, None


def _add_vocab_bias_bwd(_, grad_BMV):
  rows_NV = grad_BMV.reshape(-1, grad_BMV.shape[-1])
  return grad_BMV, jnp.ones(rows_NV.shape[0], rows_NV.dtype) @ rows_NV


add_vocab_bias.defvjp(_add_vocab_bias_fwd, _add_vocab_bias_bwd)


def _unbox(tree: Any) -> Any:
  return nn.meta.unbox(tree)


def word_embedding_table(encoder_params: Any) -> Array:
  """The [V, E] word-embedding matrix from encoder params (boxed or plain); E = embed_dim."""
  params = encoder_params
  if "embeddings" not in params and "params" in params:
    params = params["params"]
  try:
    table = params["embeddings"]["word_embeddings"]["embedding"]
  except (KeyError, TypeError) as e:
    raise KeyError(
        "encoder params have no embeddings/word_embeddings/embedding entry; pass the "
        "Encoder's params (the contents of variables['params'])") from e
  return _unbox(table)


def gather_positions(hidden_BLH: Array, positions_BM: Array) -> Array:
  """Selects [B, M, H] hidden states at per-row positions (e.g. masked slots)."""
  return jnp.take_along_axis(hidden_BLH, positions_BM[..., None].astype(jnp.int32), axis=1)
