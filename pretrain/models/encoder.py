"""The encoder for packed sequences (BERT's by default, ModernBERT's options), plus the MLM head.

With the default `EncoderConfig` the math is exactly Hugging Face ``BertModel`` /
``BertForMaskedLM`` (post-LN, learned absolute positions, token-type embeddings, exact erf GELU)
so that ``pretrain.interop.hf_bert`` can export weights that reproduce our outputs in PyTorch;
with ModernBERT's options (pre-norm, rotary positions, GeGLU, no biases, alternating local and
global attention) it is ``ModernBertModel`` / ``ModernBertForMaskedLM``
(``pretrain.interop.hf_modernbert``). The options and their combinations are described in
``pretrain.models.encoder_config``; norms, dense layers and the MLP are in
``pretrain.models.layers``, masks, rotary positions and attention in ``pretrain.models.attention``.

Sequences are packed: several documents share a row. ``segment_ids`` is 0 on
padding and 1, 2, 3, ... per document, and positions restart at 0 for each
document. Attention is block-diagonal over segments; padding attends only to
padding, so no softmax row is ever fully masked (no NaNs).

Every parameter carries T5X-style logical axis names ("vocab", "embed",
"heads", "kv", "mlp") so the training code can shard it with axis rules.

Scan over layers (``scan_layers``) and remat (``remat``): the layers are not all alike (pre-norm
layer 0 has no attention_norm; with local attention, layer i is global iff i % global_every == 0
and the two kinds differ in mask and rotary base), so rather than passing per-layer flags as scanned
inputs, which would make the window and the rotary base traced values that fused attention kernels
cannot take, the stack is cut into groups that are alike: layer 0 unrolled under pre-norm, then
``nn.scan`` over groups of ``global_every`` consecutive layers (of 1 without local attention) whose
body runs each offset with its own static kind, then any remainder unrolled
(``pretrain.models.stacking`` names the layout). ModernBERT's depths (22, 28 with global_every 3)
scan whole. Each layer is wrapped in ``nn.remat`` with the policy of ``remat``, scanned or not.

ELECTRA additions: an optional ``embedding_size`` different from ``hidden_size``
(embeddings are projected by ``embeddings_project``, as in HF ``ElectraModel``),
and ``Encoder(...)(..., shared_embeddings=...)`` so that a second encoder
(ELECTRA's generator) runs on the embedding arrays of the first.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pretrain.models import attention as attention_lib, layers, stacking
from pretrain.models.attention import segment_mask  # noqa: F401  (part of this module's API)
from pretrain.models.encoder_config import (MLM_HEADS, MLPS, NORMS, POSITIONS,  # noqa: F401
                                            EncoderConfig)

Array = jax.Array
# The building blocks under their former names (pretrain.models.decoder, objectives.detection).
_init, _zeros, _dense, _layer_norm = layers.init, layers.zeros, layers.dense, layers.layer_norm
_Einsum, _constrain = layers.Einsum, layers.constrain


class Embeddings(nn.Module):
  """Word (+ position when learned, + token-type 0 when type_vocab_size) embeddings of width
  ``embed_dim``, the norm (LayerNorm; ModernBERT's embedding norm), dropout."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids_BL, positions_BL, input_embeds_BLH=None, *, deterministic: bool):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def embed(num, axes, name):
      return nn.Embed(num, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype,
                      embedding_init=layers.init(cfg, axes), name=name)

    word = embed(cfg.padded_vocab_size, ("vocab", "embed"), "word_embeddings")
    if input_embeds_BLH is None:
      x_BLH = word(input_ids_BL)
    else:
      # Still create the table so the parameter tree does not depend on the call.
      word.embedding  # pylint: disable=pointless-statement
      x_BLH = input_embeds_BLH.astype(dtype)
    if cfg.type_vocab_size:
      # Token type is always 0 here (no sentence pairs); HF adds the same row.
      token_type = embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")
      x_BLH = x_BLH + token_type.embedding[0].astype(dtype)
    if cfg.position == "learned":
      x_BLH = x_BLH + embed(cfg.max_len, (None, "embed"), "position_embeddings")(positions_BL)
    x_BLH = layers.norm(cfg, "LayerNorm")(x_BLH)
    x_BLH = nn.Dropout(cfg.dropout_rate)(x_BLH, deterministic=deterministic)
    return layers.constrain(x_BLH)


class EncoderLayer(nn.Module):
  """One block. Post-LN (BERT): attention (+ residual, attention/LayerNorm), then the MLP,
  residual, LayerNorm. Pre-norm (ModernBERT): x + attention(attention_norm(x)) (layer 0 has no
  attention_norm: the embeddings are normed already), then x + mlp(mlp_norm(x))."""

  config: EncoderConfig
  index: int = 0  # Decides global or local attention and the rotary base.

  @nn.compact
  def __call__(self, x_BLH, mask_B1LL, positions_BL=None, deterministic: bool = True):
    # `deterministic` may be positional: nn.remat takes it as a static argument by position.
    cfg = self.config
    attention = attention_lib.Attention(cfg, attention_lib.layer_theta(cfg, self.index),
                                        name="attention")
    if not cfg.pre_norm:
      x_BLH = attention(x_BLH, x_BLH, mask_B1LL, positions_BL, deterministic=deterministic)
      h_BLH = layers.mlp(cfg, x_BLH, deterministic=deterministic)
      return layers.constrain(layers.norm(cfg, "LayerNorm")(h_BLH + x_BLH))
    h_BLH = x_BLH if self.index == 0 else layers.norm(cfg, "attention_norm")(x_BLH)
    x_BLH = x_BLH + attention(h_BLH, h_BLH, mask_B1LL, positions_BL, deterministic=deterministic)
    h_BLH = layers.mlp(cfg, layers.norm(cfg, "mlp_norm")(x_BLH), deterministic=deterministic)
    return layers.constrain(x_BLH + h_BLH)


def layer_module(config: EncoderConfig, prevent_cse: bool = True):
  """`EncoderLayer`, wrapped in `nn.remat` with the policy of `config.remat` unless "none".

  prevent_cse=False inside a scan, where jax's docs say the loop already keeps XLA from merging the
  recomputation back into the forward pass (and the barrier would cost speed)."""
  if config.remat == "none":
    return EncoderLayer
  return nn.remat(EncoderLayer, policy=layers.remat_policy(config.remat),
                  prevent_cse=prevent_cse, static_argnums=(4,))


class LayerGroup(nn.Module):
  """`size` consecutive layers from layer `first`: the body that `Encoder` scans. Offset j is
  layer first + k * size + j in the k-th step, of one static kind (global or local) in every step.
  Returns (hidden states, the stacked [size, B, L, H] outputs when `all_layers`, else None)."""

  config: EncoderConfig
  first: int
  size: int
  deterministic: bool = True
  all_layers: bool = False

  @nn.compact
  def __call__(self, x_BLH, masks, positions_BL):
    cfg = self.config
    layer = layer_module(cfg, prevent_cse=False)
    outputs = []
    for j in range(self.size):
      i = self.first + j
      mask_B1LL = masks[0] if cfg.is_global(i) else masks[1]
      x_BLH = layer(cfg, i, name=f"offset_{j}")(x_BLH, mask_B1LL, positions_BL,
                                                self.deterministic)
      outputs.append(x_BLH)
    return x_BLH, (jnp.stack(outputs) if self.all_layers else None)


class Encoder(nn.Module):
  """The encoder over packed rows.

  Parameter tree (maps 1:1 to Hugging Face BERT names, see ``pretrain.interop.hf_bert``, and with
  ModernBERT's options to its names, see ``pretrain.interop.hf_modernbert``)::

    embeddings/word_embeddings/embedding [padded_vocab_size, E]
    embeddings/{position_embeddings,token_type_embeddings}/embedding   (learned / type_vocab_size)
    embeddings/LayerNorm/{scale,bias}                (bias: norm_bias; the same for every norm)
    embeddings_project/{kernel [E,H], bias [H]}   (only when embedding_size != hidden_size)
    layer_{i}/attention/{query,key,value}/{kernel [H,N,D], bias [N,D]}   (bias: use_bias)
    layer_{i}/attention/output/{kernel [N,D,H], bias [H]}
    layer_{i}/intermediate/{kernel [H,F], bias [F]}   (gated MLP: [H,2,F], [2,F])
    layer_{i}/output/{kernel [F,H], bias [H]}
    post-LN:  layer_{i}/attention/LayerNorm, layer_{i}/LayerNorm
    pre-norm: layer_{i}/attention_norm (i > 0), layer_{i}/mlp_norm, final_norm

  With ``scan_layers`` the scanned layers sit under scanned_layers/offset_{j}/..., stacked on a
  leading "layers" axis (``pretrain.models.stacking``, which converts either way).
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
        (out-of-range lookups are not checked under jit). Rotary positions and the local
        attention window use them too.
      deterministic: disables dropout; when False a "dropout" rng is required.
      return_all_layers: return (embeddings output, layer_0 output, ...) instead
        of only the final hidden states, like HF ``output_hidden_states``; with pre_norm the
        last entry is after the final norm (it is the final hidden states).
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
        allow at least one key. Local layers still apply their window on top of it.

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
      x_BLH = layers.constrain(
          layers.dense(cfg, cfg.hidden_size, (None, "embed"), "embeddings_project")(x_BLE))
    global_B1LL = (segment_mask(segment_ids_BL) if attention_mask_B1LL is None
                   else attention_mask_B1LL)
    local_B1LL = (attention_lib.window_mask(global_B1LL, positions_BL, cfg.local_window)
                  if cfg.local_window else global_B1LL)
    outputs = [x_BLH]
    lay = stacking.layout(cfg) if cfg.scan_layers else None
    layer, i = layer_module(cfg), 0
    while i < cfg.num_layers:
      if lay is not None and lay.groups and i == lay.head:
        scan = nn.scan(LayerGroup, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=lay.groups,
                       metadata_params={nn.PARTITION_NAME: stacking.LAYERS_AXIS})
        x_BLH, stacked_GSBLH = scan(cfg, i, lay.group, deterministic, return_all_layers,
                                    name=stacking.SCANNED)(
                                        x_BLH, (global_B1LL, local_B1LL), positions_BL)
        if return_all_layers:
          outputs.extend(stacked_GSBLH.reshape(-1, *x_BLH.shape))
        i += lay.groups * lay.group
        continue
      mask_B1LL = global_B1LL if cfg.is_global(i) else local_B1LL
      x_BLH = layer(cfg, i, name=f"layer_{i}")(x_BLH, mask_B1LL, positions_BL, deterministic)
      outputs.append(x_BLH)
      i += 1
    if cfg.pre_norm:
      x_BLH = outputs[-1] = layers.constrain(layers.norm(cfg, "final_norm")(x_BLH))
    return tuple(outputs) if return_all_layers else x_BLH


class MlmHead(nn.Module):
  """MLM head: dense -> GELU -> norm -> tied projection + output bias.

  Apply it only to the gathered masked positions (M slots per row, see
  ``gather_positions``), never to all L positions: the [*, V] projection is
  the most expensive matmul in MLM pretraining.

  Parameters: dense/{kernel,bias}, LayerNorm/{scale,bias}, bias [padded_vocab_size]. The dense
  layer maps hidden_size -> embed_dim (HF ``ElectraGeneratorPredictions``; equal widths for BERT),
  so the tied projection also works with a narrower (or wider) embedding table; its bias follows
  ``use_bias``. mlm_head="bert": the norm is BERT's LayerNorm with bias; "modernbert": the model's
  norm (``norm``, ``norm_bias``), as in HF ``ModernBertPredictionHead`` + ``decoder``. With
  ``vocab_multiple`` the logits of the padded rows are cut off: the output has ``vocab_size``
  columns, so no loss, argmax or sample can ever pick a padded id (the table may also be given
  without its padded rows).
  """

  config: EncoderConfig

  @nn.compact
  def __call__(self, hidden_BMH: Array, embedding_VH: Array) -> Array:
    """Returns float32 logits [B, M, vocab_size] (float32 so the softmax loss is stable)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    rows = embedding_VH.shape[0]  # The table may come without its padded rows.
    if rows not in (cfg.vocab_size, cfg.padded_vocab_size) or embedding_VH.shape[1:] != (
        cfg.embed_dim,):
      raise ValueError(
          f"MlmHead expects the word-embedding table of shape "
          f"({cfg.padded_vocab_size}, {cfg.embed_dim}), got {embedding_VH.shape}")
    x_BME = layers.dense(cfg, cfg.embed_dim, ("embed", "mlp"), "dense")(hidden_BMH)
    x_BME = layers.activation("gelu")(x_BME)
    norm = (layers.layer_norm(cfg, "LayerNorm") if cfg.mlm_head == "bert"
            else layers.norm(cfg, "LayerNorm"))
    x_BME = norm(x_BME)
    bias_V = self.param("bias", layers.zeros(("vocab",)), (cfg.padded_vocab_size,),
                        jnp.dtype(cfg.param_dtype))[:rows]
    logits_BMV = layers.rows_dot_general(x_BME.astype(dtype), embedding_VH.astype(dtype),
                                         (((2,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
    logits_BMV = add_vocab_bias(logits_BMV, bias_V.astype(jnp.float32))
    logits_BMV = nn.with_logical_constraint(logits_BMV, ("batch", "length", "vocab"))
    return logits_BMV[..., :cfg.vocab_size] if rows != cfg.vocab_size else logits_BMV


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
