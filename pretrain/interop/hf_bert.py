"""Conversion between our Encoder/MlmHead params and Hugging Face BERT checkpoints.

Pure numpy in/out, safetensors only (no pickle). The layout written is what
``transformers`` 5 ``BertForMaskedLM.save_pretrained`` writes: the tied
``cls.predictions.decoder.{weight,bias}`` are omitted because transformers
re-ties them to ``bert.embeddings.word_embeddings.weight`` and
``cls.predictions.bias`` on load (no missing/unexpected-key warnings).
Reading accepts ``BertForMaskedLM`` and plain ``BertModel`` checkpoints, with
or without the ``bert.`` prefix.

Linear layers: HF stores ``weight`` as [out, in]; we store ``kernel`` as
[in, out] (q/k/v as [H, N, D], attention output as [N, D, H]). The head split
``n * head_dim + d`` matches HF's ``view(B, L, N, D)``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import flax.linen as nn
import numpy as np
import safetensors
import safetensors.numpy

from pretrain.models.encoder import EncoderConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# Keys (after normalising to the "bert." prefix) that some BERT checkpoints
# carry and our model has no use for: pooler, NSP head, old position_ids buffer.
_IGNORED_PREFIXES = ("bert.pooler.", "cls.seq_relationship.", "bert.embeddings.position_ids")


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


def _plain(tree: Any) -> Any:
  """Unboxes flax metadata and drops a {'params': ...} wrapper if present."""
  tree = nn.meta.unbox(tree)
  if hasattr(tree, "unfreeze"):
    tree = tree.unfreeze()
  if isinstance(tree, dict) and set(tree) == {"params"}:
    tree = tree["params"]
  return tree


def _f32(x) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x).astype(np.float32))


def _linear(p: dict, prefix: str) -> dict:
  """{kernel [in..., out...], bias} -> HF {weight [out, in], bias [out]}."""
  kernel, bias = _f32(p["kernel"]), _f32(p["bias"])
  return {f"{prefix}.weight": _f32(kernel.reshape(-1, bias.size).T),
          f"{prefix}.bias": _f32(bias.reshape(-1))}


def _qkv_in(p: dict, prefix: str) -> dict:
  """q/k/v: kernel [H, N, D] -> weight [N*D, H]."""
  kernel = _f32(p["kernel"])
  return {f"{prefix}.weight": _f32(kernel.reshape(kernel.shape[0], -1).T),
          f"{prefix}.bias": _f32(p["bias"]).reshape(-1)}


def _layer_norm(p: dict, prefix: str) -> dict:
  return {f"{prefix}.weight": _f32(p["scale"]), f"{prefix}.bias": _f32(p["bias"])}


def encoder_state_dict(enc, config: EncoderConfig, prefix: str) -> dict[str, np.ndarray]:
  """Embeddings and layers under `prefix` ("bert", "electra"): the part BERT and ELECTRA share."""
  emb = enc["embeddings"]
  sd = {f"{prefix}.embeddings.{name}.weight": _f32(emb[name]["embedding"])
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
  sd.update(_layer_norm(emb["LayerNorm"], f"{prefix}.embeddings.LayerNorm"))
  for i in range(config.num_layers):
    layer, pre = enc[f"layer_{i}"], f"{prefix}.encoder.layer.{i}"
    att = layer["attention"]
    for name in ("query", "key", "value"):
      sd.update(_qkv_in(att[name], f"{pre}.attention.self.{name}"))
    sd.update(_linear(att["output"], f"{pre}.attention.output.dense"))
    sd.update(_layer_norm(att["LayerNorm"], f"{pre}.attention.output.LayerNorm"))
    sd.update(_linear(layer["intermediate"], f"{pre}.intermediate.dense"))
    sd.update(_linear(layer["output"], f"{pre}.output.dense"))
    sd.update(_layer_norm(layer["LayerNorm"], f"{pre}.output.LayerNorm"))
  return sd


def to_hf_state_dict(encoder_params: Any, mlm_head_params: Any,
                     config: EncoderConfig) -> dict[str, np.ndarray]:
  """BertForMaskedLM state dict (float32 numpy); BertModel keys if no head params."""
  enc = _plain(encoder_params)
  head = None if mlm_head_params is None else _plain(mlm_head_params)
  sd = encoder_state_dict(enc, config, "bert")
  if head is not None:
    sd.update(_linear(head["dense"], "cls.predictions.transform.dense"))
    sd.update(_layer_norm(head["LayerNorm"], "cls.predictions.transform.LayerNorm"))
    sd["cls.predictions.bias"] = _f32(head["bias"])
  _check_shapes(sd, config)
  return sd


def write_hf_model(out_dir: str, encoder_params: Any, mlm_head_params: Any,
                   config: EncoderConfig) -> None:
  """Writes config.json and model.safetensors loadable by AutoModelForMaskedLM."""
  sd = to_hf_state_dict(encoder_params, mlm_head_params, config)
  os.makedirs(out_dir, exist_ok=True)
  cfg = hf_config(config)
  if mlm_head_params is None:
    cfg["architectures"] = ["BertModel"]
  # Write to temporary names and rename so a crash never leaves half a model.
  weights, config_path = os.path.join(out_dir, WEIGHTS_FILE), os.path.join(out_dir, CONFIG_FILE)
  safetensors.numpy.save_file(sd, weights + ".tmp", metadata={"format": "pt"})
  with open(config_path + ".tmp", "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(weights + ".tmp", weights)
  os.replace(config_path + ".tmp", config_path)


def _expected_shapes(config: EncoderConfig) -> dict[str, tuple]:
  h, f, v = config.hidden_size, config.mlp_dim, config.vocab_size
  shapes = {
      "bert.embeddings.word_embeddings.weight": (v, h),
      "bert.embeddings.position_embeddings.weight": (config.max_len, h),
      "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
      "cls.predictions.transform.dense.weight": (h, h),
      "cls.predictions.bias": (v,),
  }
  for i in range(config.num_layers):
    pre = f"bert.encoder.layer.{i}"
    shapes[f"{pre}.intermediate.dense.weight"] = (f, h)
    shapes[f"{pre}.intermediate.dense.bias"] = (f,)
    shapes[f"{pre}.output.dense.weight"] = (h, f)
    for name in ("self.query", "self.key", "self.value", "output.dense"):
      shapes[f"{pre}.attention.{name}.weight"] = (h, h)
  return shapes


def _check_shapes(sd: dict, config: EncoderConfig) -> None:
  h = config.hidden_size
  for key, shape in _expected_shapes(config).items():
    if key in sd and tuple(sd[key].shape) != shape:
      raise ValueError(f"{key}: expected shape {shape} for this config, got {tuple(sd[key].shape)}")
  for key, value in sd.items():
    if key.endswith(("LayerNorm.weight", "LayerNorm.bias")) and tuple(value.shape) != (h,):
      raise ValueError(f"{key}: expected shape ({h},), got {tuple(value.shape)}")


def encoder_config_from_hf(hf: dict) -> EncoderConfig:
  """EncoderConfig from a BertConfig dict; rejects what our encoder cannot represent."""
  if hf.get("model_type") != "bert":
    raise ValueError(f"expected model_type 'bert', got {hf.get('model_type')!r}")
  if hf.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"only hidden_act 'gelu' (exact erf) is supported, got {hf['hidden_act']!r}")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError("only position_embedding_type 'absolute' is supported, got "
                     f"{hf['position_embedding_type']!r}")
  if hf.get("is_decoder") or hf.get("add_cross_attention"):
    raise ValueError("decoder / cross-attention BERT configs are not supported")
  if hf.get("tie_word_embeddings") is False:
    raise ValueError("tie_word_embeddings=False is not supported (our MLM head is tied)")
  try:
    return EncoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"], max_len=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        dropout_rate=hf.get("hidden_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        initializer_range=hf.get("initializer_range", 0.02))
  except KeyError as e:
    raise ValueError(f"BERT config is missing required field {e.args[0]!r}") from None


def from_hf_state_dict(state_dict: dict, hf_config_dict: dict
                       ) -> tuple[EncoderConfig, dict, Optional[dict]]:
  """(EncoderConfig, encoder params, MLM head params or None) as float32 numpy trees."""
  config = encoder_config_from_hf(hf_config_dict)
  sd = {}
  for key, value in state_dict.items():
    key = key[len("bert."):] if key.startswith("bert.") else key
    key = "bert." + key if not key.startswith("cls.") else key
    sd[key] = np.asarray(value)
  unused = set(sd)

  def take(key: str) -> np.ndarray:
    if key not in sd:
      raise ValueError(f"checkpoint is missing {key!r} (with or without the 'bert.' prefix)")
    unused.discard(key)
    return np.array(sd[key], dtype=np.float32)  # A copy, so callers own the result.

  def linear(prefix, in_shape=None, out_shape=None):
    weight, bias = take(prefix + ".weight"), take(prefix + ".bias")
    kernel = weight.T
    if in_shape:
      kernel = kernel.reshape(in_shape + kernel.shape[1:])
    if out_shape:
      kernel, bias = kernel.reshape(kernel.shape[:-1] + out_shape), bias.reshape(out_shape)
    return {"kernel": np.ascontiguousarray(kernel), "bias": bias}

  def layer_norm(prefix):
    return {"scale": take(prefix + ".weight"), "bias": take(prefix + ".bias")}

  _check_shapes(sd, config)
  heads = (config.num_heads, config.head_dim)
  enc = {"embeddings": {
      name: {"embedding": take(f"bert.embeddings.{name}.weight")}
      for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")}}
  enc["embeddings"]["LayerNorm"] = layer_norm("bert.embeddings.LayerNorm")
  for i in range(config.num_layers):
    pre = f"bert.encoder.layer.{i}"
    att = {name: linear(f"{pre}.attention.self.{name}", out_shape=heads)
           for name in ("query", "key", "value")}
    att["output"] = linear(f"{pre}.attention.output.dense", in_shape=heads)
    att["LayerNorm"] = layer_norm(f"{pre}.attention.output.LayerNorm")
    enc[f"layer_{i}"] = {
        "attention": att,
        "intermediate": linear(f"{pre}.intermediate.dense"),
        "output": linear(f"{pre}.output.dense"),
        "LayerNorm": layer_norm(f"{pre}.output.LayerNorm"),
    }

  head = None
  if "cls.predictions.transform.dense.weight" in sd:
    if "cls.predictions.bias" not in sd and "cls.predictions.decoder.bias" in sd:
      sd["cls.predictions.bias"] = sd["cls.predictions.decoder.bias"]
    head = {"dense": linear("cls.predictions.transform.dense"),
            "LayerNorm": layer_norm("cls.predictions.transform.LayerNorm"),
            "bias": take("cls.predictions.bias")}
    decoder = sd.get("cls.predictions.decoder.weight")
    if decoder is not None and not np.array_equal(decoder, sd["bert.embeddings.word_embeddings.weight"]):
      raise ValueError("cls.predictions.decoder.weight differs from the word embeddings; "
                       "only tied MLM heads are supported")
    unused.discard("cls.predictions.decoder.weight")
    unused.discard("cls.predictions.decoder.bias")
  unused = {k for k in unused if not k.startswith(_IGNORED_PREFIXES)}
  if unused:
    raise ValueError(f"checkpoint has keys this encoder cannot represent: {sorted(unused)[:10]}")
  return config, enc, head


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except TypeError:
    # Plain numpy has no bfloat16; the flax loader returns ml_dtypes arrays.
    with safetensors.safe_open(path, framework="flax") as f:
      return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}


def read_hf_model(model_dir: str) -> tuple[EncoderConfig, dict, Optional[dict]]:
  """Reads config.json + model.safetensors written by us or by transformers."""
  config_path = os.path.join(model_dir, CONFIG_FILE)
  weights_path = os.path.join(model_dir, WEIGHTS_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path}: no such file (expected a Hugging Face model dir)")
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{config_path}: not valid JSON ({e})") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{config_path}: expected a JSON object, got {type(hf).__name__}")
  if hf.get("model_type") != "bert":
    raise ValueError(f"{config_path}: model_type is {hf.get('model_type')!r}, only 'bert' is "
                     "supported")
  if not os.path.isfile(weights_path):
    extra = ""
    if os.path.isfile(weights_path + ".index.json"):
      extra = " (sharded checkpoints are not supported)"
    elif os.path.isfile(os.path.join(model_dir, "pytorch_model.bin")):
      extra = " (only safetensors is supported; pytorch_model.bin uses pickle)"
    raise FileNotFoundError(f"{weights_path}: no such file{extra}")
  try:
    state_dict = _load_safetensors(weights_path)
  except Exception as e:  # SafetensorError on a corrupt/truncated file, OSError, ...
    raise ValueError(f"{weights_path}: cannot read safetensors file ({type(e).__name__}: {e})"
                     ) from None
  try:
    return from_hf_state_dict(state_dict, hf)
  except ValueError as e:
    raise ValueError(f"{model_dir}: {e}") from None
