"""RetroMAE's enhanced decoder: one encoder layer whose queries and keys/values are two streams.

The query stream carries only the sentence embedding (h + the position of the token to predict),
the key/value stream carries h and the original token embeddings; each query row sees a sampled
part of its segment through a position-specific mask (`objectives.retromae.decoder_attention_mask`).
The layer is of the encoder's kind (`pretrain.models.encoder.EncoderLayer`): its MLP, norms,
biases and positions follow the same `EncoderConfig`.

Post-LN (BERT): the residual of the attention sub-block adds the query stream, as in the official
code's ``BertLayerForDecoder``; parameter names are `EncoderLayer`'s (attention/{query,key,value,
output,LayerNorm}, intermediate, output, LayerNorm), so the layer maps onto a Hugging Face
``BertLayer``. Pre-norm: query + attention(query, kv) (both streams are normed already, like the
input of the encoder's layer 0), then + mlp(mlp_norm(x)), and a `final_norm` before the MLM head
as the encoder has. With rotary positions, queries and keys are rotated at `positions_BL` (the
streams are aligned slot by slot) with the global base.
"""
import flax.linen as nn

from pretrain.models import attention as attention_lib, layers
from pretrain.models.encoder_config import EncoderConfig


class CrossAttention(attention_lib.Attention):
  """`attention.Attention` of `query_BLH` over `kv_BLH` (its post-LN residual adds the query)."""


class DecoderLayer(nn.Module):
  """`CrossAttention`, then the encoder's MLP sub-block; one encoder layer's cost."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, query_BLH, kv_BLH, mask_B1LL, positions_BL=None, *,
               deterministic: bool = True):
    cfg = self.config
    attention = CrossAttention(cfg, cfg.rope_theta, name="attention")
    x_BLH = attention(query_BLH, kv_BLH, mask_B1LL, positions_BL, deterministic=deterministic)
    if not cfg.pre_norm:
      h_BLH = layers.mlp(cfg, x_BLH, deterministic=deterministic)
      return layers.constrain(layers.norm(cfg, "LayerNorm")(h_BLH + x_BLH))
    x_BLH = query_BLH + x_BLH
    x_BLH = x_BLH + layers.mlp(cfg, layers.norm(cfg, "mlp_norm")(x_BLH),
                               deterministic=deterministic)
    return layers.constrain(layers.norm(cfg, "final_norm")(x_BLH))
