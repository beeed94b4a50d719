"""Export of our Encoder/MlmHead params as Hugging Face BERT checkpoints.

Pure numpy in/out, safetensors only (no pickle). The layout written is what
``transformers`` 5 ``BertForMaskedLM.save_pretrained`` writes: the tied
``cls.predictions.decoder.{weight,bias}`` are omitted because transformers
re-ties them to ``bert.embeddings.word_embeddings.weight`` and
``cls.predictions.bias`` on load (no missing/unexpected-key warnings).
Reading them back (and transformers' own checkpoints) is `pretrain.interop.hf_read`'s.

Linear layers: HF stores ``weight`` as [out, in]; we store ``kernel`` as
[in, out] (q/k/v as [H, N, D], attention output as [N, D, H]). The head split
``n * head_dim + d`` matches HF's ``view(B, L, N, D)``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import numpy as np
import safetensors.numpy

from pretrain.interop import files, hf_read
from pretrain.models.encoder import EncoderConfig

# BertForMaskedLM's head: the transform dense layer, its LayerNorm and the output bias.
_HEAD_KEYS = ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
              "cls.predictions.bias")


def hf_config(config: EncoderConfig) -> dict:
  """A ``BertConfig`` dict describing ``config`` (for config.json)."""
  return {
      "model_type": "bert",
      "architectures": ["BertForMaskedLM"],
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "intermediate_size": config.mlp_dim,
      "hidden_act": "gelu",  # Exact erf GELU in HF.
      "hidden_dropout_prob": config.dropout_rate,
      # Our attention has no probability dropout (see SelfAttention).
      "attention_probs_dropout_prob": 0.0,
      "max_position_embeddings": config.max_len,
      "type_vocab_size": config.type_vocab_size,
      "layer_norm_eps": config.layer_norm_eps,
      "initializer_range": config.initializer_range,
      "pad_token_id": 0,
      "position_embedding_type": "absolute",
      "is_decoder": False,
      "add_cross_attention": False,
      "tie_word_embeddings": True,
  }


def plain(tree: Any) -> Any:
  """Unboxes flax metadata and drops a {'params': ...} wrapper if present."""
  tree = nn.meta.unbox(tree)
  if hasattr(tree, "unfreeze"):
    tree = tree.unfreeze()
  if isinstance(tree, dict) and set(tree) == {"params"}:
    tree = tree["params"]
  return tree


def f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x).astype(np.float32))


def linear(p: dict, prefix: str) -> dict:
  """{kernel [in..., out...], bias} -> HF {weight [out, in], bias [out]}."""
  kernel, bias = f32(p["kernel"]), f32(p["bias"])
  return {f"{prefix}.weight": f32(kernel.reshape(-1, bias.size).T),
          f"{prefix}.bias": f32(bias.reshape(-1))}


def _qkv_in(p: dict, prefix: str) -> dict:
  """q/k/v: kernel [H, N, D] -> weight [N*D, H]."""
  kernel = f32(p["kernel"])
  return {f"{prefix}.weight": f32(kernel.reshape(kernel.shape[0], -1).T),
          f"{prefix}.bias": f32(p["bias"]).reshape(-1)}


def layer_norm(p: dict, prefix: str) -> dict:
  return {f"{prefix}.weight": f32(p["scale"]), f"{prefix}.bias": f32(p["bias"])}


def encoder_state_dict(enc, config: EncoderConfig, prefix: str) -> dict[str, np.ndarray]:
  """Embeddings and layers under `prefix` ("bert", "electra"): the part BERT and ELECTRA share."""
  emb = enc["embeddings"]
  sd = {f"{prefix}.embeddings.{name}.weight": f32(emb[name]["embedding"])
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
  sd.update(layer_norm(emb["LayerNorm"], f"{prefix}.embeddings.LayerNorm"))
  for i in range(config.num_layers):
    layer, pre = enc[f"layer_{i}"], f"{prefix}.encoder.layer.{i}"
    att = layer["attention"]
    for name in ("query", "key", "value"):
      sd.update(_qkv_in(att[name], f"{pre}.attention.self.{name}"))
    sd.update(linear(att["output"], f"{pre}.attention.output.dense"))
    sd.update(layer_norm(att["LayerNorm"], f"{pre}.attention.output.LayerNorm"))
    sd.update(linear(layer["intermediate"], f"{pre}.intermediate.dense"))
    sd.update(linear(layer["output"], f"{pre}.output.dense"))
    sd.update(layer_norm(layer["LayerNorm"], f"{pre}.output.LayerNorm"))
  return sd


def to_hf_state_dict(encoder_params: Any, mlm_head_params: Any,
                     config: EncoderConfig) -> dict[str, np.ndarray]:
  """BertForMaskedLM state dict (float32 numpy); BertModel keys if no head params."""
  enc = plain(encoder_params)
  head = None if mlm_head_params is None else plain(mlm_head_params)
  sd = encoder_state_dict(enc, config, "bert")
  if head is not None:
    dense, norm, bias = _HEAD_KEYS
    sd.update(linear(head["dense"], dense))
    sd.update(layer_norm(head["LayerNorm"], norm))
    sd[bias] = f32(head["bias"])
  _check_shapes(sd, config)
  return sd


def _check_shapes(sd: dict, config: EncoderConfig) -> None:
  """Each tensor has the shape that config.json declares, by the reader's table."""
  shapes = {"bert." + k: v for k, v in hf_read.expected_shapes(config).items()}
  shapes["bert.embeddings.position_embeddings.weight"] = (config.max_len, config.embed_dim)
  shapes.update(hf_read.mlm_head_shapes(config, *_HEAD_KEYS))
  for key, value in sd.items():
    if key in shapes and value.shape != shapes[key]:
      raise ValueError(f"{key}: shape {value.shape}, but the encoder config implies "
                       f"{shapes[key]}; the params and the config do not belong together.")


def write_files(out_dir: str, sd: dict, cfg: dict) -> None:
  """config.json + model.safetensors, each written under a temporary name and renamed, so that a
  crash never leaves half a model."""
  os.makedirs(out_dir, exist_ok=True)
  weights = os.path.join(out_dir, files.WEIGHTS_FILE)
  config_path = os.path.join(out_dir, files.CONFIG_FILE)
  safetensors.numpy.save_file(sd, weights + ".tmp", metadata={"format": "pt"})
  with open(config_path + ".tmp", "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(weights + ".tmp", weights)
  os.replace(config_path + ".tmp", config_path)


def write_hf_model(out_dir: str, encoder_params: Any, mlm_head_params: Any,
                   config: EncoderConfig) -> None:
  """Writes config.json and model.safetensors loadable by AutoModelForMaskedLM."""
  cfg = hf_config(config)
  if mlm_head_params is None:
    cfg["architectures"] = ["BertModel"]
  write_files(out_dir, to_hf_state_dict(encoder_params, mlm_head_params, config), cfg)
