"""RetroMAE's enhanced decoder: one BERT layer whose queries and keys/values are two streams.

The query stream carries only the sentence embedding (h + the position of the token to predict),
the key/value stream carries h and the original token embeddings; each query row sees a sampled
part of its segment through a position-specific mask (`objectives.retromae.decoder_attention_mask`).
The residual of the attention sub-block adds the query stream, as in the official code's
``BertLayerForDecoder``. Parameter names are `EncoderLayer`'s (attention/{query,key,value,output,
LayerNorm}, intermediate, output, LayerNorm), so the layer maps onto a Hugging Face ``BertLayer``.
"""
import flax.linen as nn
import jax

from pretrain.models import encoder as enc

# pylint: disable=protected-access  # The encoder's annotated building blocks, reused as they are.
_Einsum, _dense, _layer_norm, _constrain = enc._Einsum, enc._dense, enc._layer_norm, enc._constrain


class CrossAttention(nn.Module):
  """Multi-head attention of `query_BLH` over `kv_BLH`, output projection, dropout, residual, LN."""

  config: enc.EncoderConfig

  @nn.compact
  def __call__(self, query_BLH, kv_BLH, mask_B1LL, *, deterministic: bool):
    cfg = self.config

    def project(name, x_BLH):
      y = _Einsum(cfg, "blh,hnd->blnd", (cfg.hidden_size, cfg.num_heads, cfg.head_dim),
                  ("embed", "heads", "kv"), name=name)(x_BLH)
      return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

    q_BLND, k_BLND, v_BLND = (project("query", query_BLH), project("key", kv_BLH),
                              project("value", kv_BLH))
    out_BLND = jax.nn.dot_product_attention(q_BLND, k_BLND, v_BLND, mask=mask_B1LL)
    out_BLND = nn.with_logical_constraint(out_BLND, ("batch", "length", "heads", "kv"))
    out_BLH = _Einsum(cfg, "blnd,ndh->blh", (cfg.num_heads, cfg.head_dim, cfg.hidden_size),
                      ("heads", "kv", "embed"), name="output")(out_BLND)
    out_BLH = nn.Dropout(cfg.dropout_rate)(out_BLH, deterministic=deterministic)
    return _constrain(_layer_norm(cfg, "LayerNorm")(out_BLH + query_BLH))


class DecoderLayer(nn.Module):
  """`CrossAttention`, then BERT's GELU MLP sub-block (post-LN), as one encoder layer costs."""

  config: enc.EncoderConfig

  @nn.compact
  def __call__(self, query_BLH, kv_BLH, mask_B1LL, *, deterministic: bool = True):
    cfg = self.config
    x_BLH = CrossAttention(cfg, name="attention")(query_BLH, kv_BLH, mask_B1LL,
                                                  deterministic=deterministic)
    h_BLF = _dense(cfg, cfg.mlp_dim, ("embed", "mlp"), "intermediate")(x_BLH)
    h_BLF = _constrain(nn.gelu(h_BLF, approximate=False), "mlp")
    h_BLH = _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h_BLF)
    h_BLH = nn.Dropout(cfg.dropout_rate)(h_BLH, deterministic=deterministic)
    return _constrain(_layer_norm(cfg, "LayerNorm")(h_BLH + x_BLH))
