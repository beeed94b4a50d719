"""Export of our Encoder/MlmHead params as Hugging Face ModernBERT checkpoints.

An encoder whose options are ModernBERT's (`expressible`: pre-norm, rotary positions, GeGLU or
SwiGLU, LayerNorm with or without bias, no token types, no embedding projection, the
"modernbert" MLM head) is written as ``ModernBertForMaskedLM`` (or ``ModernBertModel`` without a
head): config.json + model.safetensors in the layout transformers 5 writes, the tied
``decoder.weight`` omitted (re-tied to ``model.embeddings.tok_embeddings.weight`` on load).
Reading it back (and transformers' own checkpoints) is `pretrain.interop.hf_read`'s.

Names: our query / key / value kernels [H, N, D] are concatenated into ``attn.Wqkv`` [3 N D, H]
(HF views its output as (3, N, D)); the gated MLP's intermediate kernel [H, 2, F] is ``mlp.Wi``
[2 F, H] (input half first, then the gate, as HF's ``chunk(2)``). One ``use_bias`` gives
attention_bias, mlp_bias and classifier_bias; one norm (``norm_bias``, ``layer_norm_eps``) gives
every norm. config.json has the transformers 5 fields (layer_types, rope_parameters) and those
of transformers 4 (global_attn_every_n_layers, global_rope_theta, local_rope_theta).

Dropout: transformers applies attention_dropout to the attention probabilities too, which our
encoder never does, so it is 0.0; embedding_dropout and mlp_dropout are our dropout_rate (ours is
applied after the MLP's output projection, HF's before it: equal at inference).

A padded vocabulary (`vocab_multiple`) is written padded, as ModernBERT's own checkpoints are
(vocab_size is the table's rows); the decoder bias of the padded rows is PADDED_ROW_BIAS, so that
transformers, like our head, never predicts a padded id.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from pretrain.data import tokenizer_common
from pretrain.interop import hf_bert
from pretrain.models.encoder_config import EncoderConfig

PADDED_ROW_BIAS = -1e4  # exp(-1e4) is 0 in every float type, and -1e4 fits float16.


def expressible(config: EncoderConfig) -> Optional[str]:
  """None when ModernBertForMaskedLM can hold `config`, else the first option it cannot."""
  wanted = [("pre_norm", True), ("position", "rope"), ("norm", "layernorm"),
            ("type_vocab_size", 0), ("embedding_size", None), ("mlm_head", "modernbert")]
  for name, value in wanted:
    if getattr(config, name) != value:
      return f"{name}={getattr(config, name)!r} (ModernBERT has {name}={value!r})"
  if not config.gated:
    return f"mlp={config.mlp!r} (ModernBERT's MLP is gated: geglu or swiglu)"
  return None


def bert_expressible(config: EncoderConfig) -> Optional[str]:
  """None when BertForMaskedLM (and ELECTRA) can hold `config`, else the first option it cannot."""
  wanted = [("position", "learned"), ("mlp", "gelu"), ("pre_norm", False), ("norm", "layernorm"),
            ("norm_bias", True), ("use_bias", True), ("local_window", 0), ("mlm_head", "bert")]
  for name, value in wanted:
    if getattr(config, name) != value:
      return f"{name}={getattr(config, name)!r} (BERT has {name}={value!r})"
  if not config.type_vocab_size:
    return "type_vocab_size=0 (BERT has token-type embeddings)"
  return None


def hf_architecture(config: EncoderConfig) -> tuple[Optional[str], str]:
  """("bert" or "modernbert", "") for the Hugging Face architecture that holds `config`, or
  (None, why neither does)."""
  why_not_bert, why_not_modernbert = bert_expressible(config), expressible(config)
  if why_not_bert is None:
    return "bert", ""
  if why_not_modernbert is None:
    return "modernbert", ""
  return None, f"not BERT: {why_not_bert}; not ModernBERT: {why_not_modernbert}"


def unpadded_view(config: EncoderConfig) -> EncoderConfig:
  """`config` with the padded rows as ordinary vocabulary: what a Hugging Face config declares."""
  return dataclasses.replace(config, vocab_size=config.padded_vocab_size, vocab_multiple=1)


def padded_head(head: Any, config: EncoderConfig) -> Any:
  """MLM head params whose bias rows beyond vocab_size are PADDED_ROW_BIAS (None stays None)."""
  if head is None or config.padded_vocab_size == config.vocab_size:
    return head
  head = hf_bert.plain(head)
  bias = hf_bert.f32(head["bias"]).copy()
  bias[config.vocab_size:] = PADDED_ROW_BIAS
  return {**head, "bias": bias}


def hf_config(config: EncoderConfig, architecture: str = "ModernBertForMaskedLM") -> dict:
  """A ``ModernBertConfig`` dict describing `config` (for config.json)."""
  if expressible(config) is not None:
    raise ValueError(f"ModernBERT cannot express {expressible(config)}.")
  types = ["full_attention" if config.is_global(i) else "sliding_attention"
           for i in range(config.num_layers)]
  ids = tokenizer_common
  return {
      "model_type": "modernbert",
      "architectures": [architecture],
      "vocab_size": config.padded_vocab_size,
      "hidden_size": config.hidden_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "intermediate_size": config.mlp_dim,
      "hidden_activation": "silu" if config.mlp == "swiglu" else "gelu",  # exact erf GELU
      "max_position_embeddings": config.max_len,
      "initializer_range": config.initializer_range,
      "norm_eps": config.layer_norm_eps,
      "norm_bias": config.norm_bias,
      "attention_bias": config.use_bias, "mlp_bias": config.use_bias,
      "classifier_bias": config.use_bias, "decoder_bias": True,
      "classifier_activation": "gelu",
      "attention_dropout": 0.0,
      "embedding_dropout": config.dropout_rate, "mlp_dropout": config.dropout_rate,
      "local_attention": config.local_window or config.max_len,
      "layer_types": types,
      "rope_parameters": {
          "full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
          "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_theta}},
      # transformers 4 reads these instead of layer_types / rope_parameters.
      "global_attn_every_n_layers": config.global_every if config.local_window else 1,
      "global_rope_theta": config.rope_theta, "local_rope_theta": config.rope_local_theta,
      "pad_token_id": ids.PAD_ID, "bos_token_id": ids.CLS_ID, "cls_token_id": ids.CLS_ID,
      "eos_token_id": ids.SEP_ID, "sep_token_id": ids.SEP_ID,
      "tie_word_embeddings": True,
  }


def _linear(kernel, bias, prefix: str, out: int) -> dict:
  """kernel [in..., out...] -> weight [out, in] (+ bias [out] when the layer has one)."""
  kernel = hf_bert.f32(kernel)
  sd = {f"{prefix}.weight": hf_bert.f32(kernel.reshape(-1, out).T)}
  if bias is not None:
    sd[f"{prefix}.bias"] = hf_bert.f32(np.reshape(bias, -1))
  return sd


def _norm(p: dict, prefix: str) -> dict:
  sd = {f"{prefix}.weight": hf_bert.f32(p["scale"])}
  if "bias" in p:
    sd[f"{prefix}.bias"] = hf_bert.f32(p["bias"])
  return sd


def to_hf_state_dict(encoder_params: Any, mlm_head_params: Any,
                     config: EncoderConfig) -> dict[str, np.ndarray]:
  """ModernBertForMaskedLM state dict (float32 numpy); without head params, ModernBertModel's
  keys (still under "model.", which transformers strips for a bare ModernBertModel)."""
  enc = hf_bert.plain(encoder_params)
  h, f = config.hidden_size, config.mlp_dim
  emb = enc["embeddings"]
  sd = {"model.embeddings.tok_embeddings.weight": hf_bert.f32(emb["word_embeddings"]["embedding"])}
  sd.update(_norm(emb["LayerNorm"], "model.embeddings.norm"))
  for i in range(config.num_layers):
    layer, pre = enc[f"layer_{i}"], f"model.layers.{i}"
    att = layer["attention"]
    qkv = [hf_bert.f32(att[name]["kernel"]).reshape(h, -1) for name in ("query", "key", "value")]
    bias = ([hf_bert.f32(att[name]["bias"]).reshape(-1) for name in ("query", "key", "value")]
            if config.use_bias else None)
    sd.update(_linear(np.concatenate(qkv, 1), None if bias is None else np.concatenate(bias),
                      f"{pre}.attn.Wqkv", 3 * h))
    sd.update(_linear(att["output"]["kernel"], att["output"].get("bias"), f"{pre}.attn.Wo", h))
    if i:
      sd.update(_norm(layer["attention_norm"], f"{pre}.attn_norm"))
    sd.update(_norm(layer["mlp_norm"], f"{pre}.mlp_norm"))
    sd.update(_linear(layer["intermediate"]["kernel"], layer["intermediate"].get("bias"),
                      f"{pre}.mlp.Wi", 2 * f))
    sd.update(_linear(layer["output"]["kernel"], layer["output"].get("bias"), f"{pre}.mlp.Wo", h))
  sd.update(_norm(enc["final_norm"], "model.final_norm"))
  if mlm_head_params is not None:
    head = padded_head(mlm_head_params, config)
    sd.update(_linear(head["dense"]["kernel"], head["dense"].get("bias"), "head.dense", h))
    sd.update(_norm(head["LayerNorm"], "head.norm"))
    sd["decoder.bias"] = hf_bert.f32(head["bias"])
  _check_shapes(sd, config)
  return sd


def _check_shapes(sd: dict, config: EncoderConfig) -> None:
  """The tensors have the shapes config.json declares (the params belong to the config)."""
  v, h = config.padded_vocab_size, config.hidden_size
  shapes = {"model.embeddings.tok_embeddings.weight": (v, h), "decoder.bias": (v,),
            "head.dense.weight": (h, h)}
  for i in range(config.num_layers):
    pre = f"model.layers.{i}."
    shapes.update({pre + "attn.Wqkv.weight": (3 * h, h), pre + "attn.Wo.weight": (h, h),
                   pre + "mlp.Wi.weight": (2 * config.mlp_dim, h),
                   pre + "mlp.Wo.weight": (h, config.mlp_dim)})
  for key, shape in shapes.items():
    if key in sd and sd[key].shape != shape:
      raise ValueError(f"{key}: shape {sd[key].shape}, but the encoder config implies {shape}; "
                       "the params and the config do not belong together.")


def write_hf_model(out_dir: str, encoder_params: Any, mlm_head_params: Any,
                   config: EncoderConfig) -> None:
  """Writes config.json and model.safetensors loadable by AutoModelForMaskedLM (AutoModel
  without a head)."""
  cfg = hf_config(config, "ModernBertModel" if mlm_head_params is None else
                  "ModernBertForMaskedLM")
  hf_bert.write_files(out_dir, to_hf_state_dict(encoder_params, mlm_head_params, config), cfg)
