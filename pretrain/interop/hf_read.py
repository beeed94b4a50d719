"""Import local Hugging Face BERT / ELECTRA / RoBERTa / ModernBERT safetensors directories as our
Encoder params.

  imported = hf_read.read_hf_encoder("path/to/hf_dir")  # config.json + model.safetensors
  imported.config, imported.encoder, imported.heads        # EncoderConfig, params, MLM/RTD heads

All three are post-LN BERT encoders with learned absolute positions and exact GELU, which is
exactly `pretrain.models.encoder.Encoder`; they differ only in key prefixes, heads, and two
details handled here:
  * ELECTRA: `embedding_size` may differ from `hidden_size` (an `embeddings_project` layer);
  * RoBERTa: position ids start at padding_idx + 1 = pad_token_id + 1 (2), so HF's row p is
    our position p - 2: the table is imported without its first rows and `max_len` shrinks by
    the same amount (514 -> 512). The outputs then equal RobertaModel's for unpadded tokens.
Heads that our objectives have are imported too (for `--config.init_from`): BERT's
`cls.predictions`, ELECTRA's generator head and RoBERTa's `lm_head` as "mlm_head", ELECTRA's
`discriminator_predictions` as "discriminator_head". Poolers and task heads are ignored.

ModernBERT (ModernBertForMaskedLM / ModernBertModel) is our encoder with its options
(`pretrain.models.encoder_config`); its fused Wqkv / Wi are split into our query, key, value and
input / gate kernels, and its head (head.dense, head.norm, decoder.bias) becomes "mlm_head".

This is the one Hugging Face reader (`pretrain.interop.hf_bert`, `hf_electra`, `hf_modernbert`
write); `pretrain.interop.load.load_encoder(path)` reads any model path through it.
Only safetensors is read (no pickle); a corrupt file, a missing tensor, a wrong shape, an untied
MLM head or an architecture our encoder cannot represent is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np
import safetensors
import safetensors.numpy

from pretrain.interop import files
from pretrain.models.encoder import EncoderConfig

# The model types read; each is also the key prefix of the encoder inside task checkpoints
# (BertForMaskedLM: "bert."), but ModernBERT's ("model.", _KEY_PREFIX).
MODEL_TYPES = ("bert", "electra", "roberta", "modernbert")
_KEY_PREFIX = {"modernbert": "model"}
# Keys no head of ours uses: poolers, task heads, NSP, position-id buffers.
_IGNORED = ("pooler.", "cls.seq_relationship.", "classifier.", "qa_outputs.",
            "embeddings.position_ids", "embeddings.token_type_ids", "lm_head.decoder.",
            "cls.predictions.decoder.", "generator_lm_head.weight", "decoder.weight", "head.")


@dataclasses.dataclass
class Imported:
  """An encoder read from a Hugging Face directory (float32 numpy trees)."""
  config: EncoderConfig
  encoder: dict
  heads: dict  # "mlm_head" / "discriminator_head" when the checkpoint has them.
  model_type: str
  position_offset: int  # HF position id of our position 0 (2 for RoBERTa, else 0).


def read_config(model_dir: str) -> dict:
  """config.json of `model_dir` as a dict, with errors that say what is wrong."""
  path = os.path.join(model_dir, files.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file; expected a Hugging Face model directory "
                            "(config.json + model.safetensors).")
  try:
    with open(path, encoding="utf-8") as f:
      hf = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e}).") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(hf).__name__}.")
  return hf


def position_offset(hf: dict) -> int:
  """HF position id of the first token: RoBERTa counts from padding_idx + 1."""
  return int(hf.get("pad_token_id", 1)) + 1 if hf.get("model_type") == "roberta" else 0


def encoder_config_from_hf(hf: dict) -> EncoderConfig:
  """EncoderConfig of a config dict of MODEL_TYPES; rejects what our encoder cannot run."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(
        f"model_type {model_type!r} is not supported; the import reads BERT-architecture "
        f"encoders: {', '.join(MODEL_TYPES)}.")
  if model_type == "modernbert":
    return _modernbert_config(hf)
  checks = [
      (hf.get("hidden_act", "gelu") == "gelu",
       f"hidden_act {hf.get('hidden_act')!r} (only 'gelu', the exact erf GELU, is supported)"),
      (hf.get("position_embedding_type", "absolute") == "absolute",
       f"position_embedding_type {hf.get('position_embedding_type')!r} (only 'absolute')"),
      (not hf.get("is_decoder") and not hf.get("add_cross_attention"),
       "a decoder / cross-attention configuration"),
  ]
  for ok, what in checks:
    if not ok:
      raise ValueError(f"{model_type} config has {what}; our encoder cannot represent it.")
  offset = position_offset(hf)
  try:
    embedding_size = hf.get("embedding_size", hf["hidden_size"])
    return EncoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"], max_len=hf["max_position_embeddings"] - offset,
        type_vocab_size=hf.get("type_vocab_size", 2),
        dropout_rate=hf.get("hidden_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        initializer_range=hf.get("initializer_range", 0.02),
        embedding_size=None if embedding_size == hf["hidden_size"] else embedding_size)
  except KeyError as e:
    raise ValueError(f"{model_type} config is missing required field {e.args[0]!r}.") from None


def modernbert_layer_pattern(hf: dict) -> tuple[int, int]:
  """(local_window, global_every) of a ModernBERT config: its layer_types (or, in configs of
  transformers 4, global_attn_every_n_layers) must be "layer i is global iff i % n == 0"."""
  layers, n = hf["num_hidden_layers"], hf.get("global_attn_every_n_layers", 3)
  types = hf.get("layer_types") or ["full_attention" if i % n == 0 else "sliding_attention"
                                    for i in range(layers)]
  n = next((i for i, t in enumerate(types) if i and t == "full_attention"), layers)
  if len(types) != layers or [t == "full_attention" for t in types] != [
      i % n == 0 for i in range(layers)]:
    raise ValueError(f"layer_types {types} (only 'layer i is global iff i % n == 0')")
  return (0, 3) if n == 1 else (hf.get("local_attention", 128), n)


def _rope_theta(hf: dict, kind: str, legacy: str, default: float) -> float:
  params = (hf.get("rope_parameters") or {}).get(kind) or {}
  if params.get("rope_type", "default") != "default":
    raise ValueError(f"rope_type {params['rope_type']!r} (only 'default' rotary embeddings)")
  return float(params.get("rope_theta", hf.get(legacy) or default))


def _modernbert_config(hf: dict) -> EncoderConfig:
  """ModernBertConfig -> our encoder with its options (see the module docstring)."""
  activations, act = {"gelu": "geglu", "silu": "swiglu"}, hf.get("hidden_activation", "gelu")
  biases = {hf.get(k, False) for k in ("attention_bias", "mlp_bias", "classifier_bias")}
  try:
    if act not in activations or hf.get("classifier_activation", "gelu") != "gelu" or len(biases) > 1:
      raise ValueError(f"hidden_activation {act!r}, classifier_activation "
                       f"{hf.get('classifier_activation')!r} or unequal attention / mlp / "
                       "classifier biases (only 'gelu' or 'silu', 'gelu', one use_bias for all)")
    local_window, global_every = modernbert_layer_pattern(hf)
    return EncoderConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 8192),
        type_vocab_size=0, dropout_rate=hf.get("mlp_dropout", 0.0),
        layer_norm_eps=hf.get("norm_eps", 1e-5), initializer_range=hf.get("initializer_range", 0.02),
        position="rope", rope_theta=_rope_theta(hf, "full_attention", "global_rope_theta", 160000.0),
        rope_local_theta=_rope_theta(hf, "sliding_attention", "local_rope_theta", 10000.0),
        mlp=activations[act], pre_norm=True, norm_bias=hf.get("norm_bias", False),
        use_bias=biases.pop(), local_window=local_window, global_every=global_every,
        mlm_head="modernbert")
  except KeyError as e:
    raise ValueError(f"modernbert config is missing required field {e.args[0]!r}.") from None
  except ValueError as e:
    raise ValueError(f"modernbert config has {e}; our encoder cannot represent it.") from None


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except TypeError:
    # Plain numpy has no bfloat16; the flax loader returns ml_dtypes arrays.
    with safetensors.safe_open(path, framework="flax") as f:
      return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}


def load_state_dict(model_dir: str) -> dict[str, np.ndarray]:
  """Tensors of model.safetensors, or of every shard an index file lists."""
  single = os.path.join(model_dir, files.WEIGHTS_FILE)
  index = os.path.join(model_dir, files.INDEX_FILE)
  if os.path.isfile(single):
    shards = [single]
  elif os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      shards = [os.path.join(model_dir, name)
               for name in sorted(set(json.load(f)["weight_map"].values()))]
  else:
    extra = (" (only safetensors is read; pytorch_model.bin would need pickle: re-save it with "
             "save_pretrained(..., safe_serialization=True))"
             if os.path.isfile(os.path.join(model_dir, "pytorch_model.bin")) else "")
    raise FileNotFoundError(f"{single}: no such file{extra}.")
  sd = {}
  for path in shards:
    try:
      sd.update(_load_safetensors(path))
    except Exception as e:  # SafetensorError on a corrupt or truncated file, OSError, ...
      raise ValueError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e}); the "
                       "file is corrupt or truncated, download or export it again.") from None
  return sd


def expected_shapes(config: EncoderConfig) -> dict[str, tuple]:
  """Shapes of the encoder keys (without prefix) but the position table, whose rows depend on
  the model type (see `position_offset`)."""
  h, f, e = config.hidden_size, config.mlp_dim, config.embed_dim
  shapes = {"embeddings.word_embeddings.weight": (config.vocab_size, e),
            "embeddings.token_type_embeddings.weight": (config.type_vocab_size, e),
            "embeddings.LayerNorm.weight": (e,), "embeddings.LayerNorm.bias": (e,)}
  if config.projects_embeddings:
    shapes.update({"embeddings_project.weight": (h, e), "embeddings_project.bias": (h,)})
  for i in range(config.num_layers):
    pre = f"encoder.layer.{i}."
    for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"):
      shapes.update({pre + name + ".weight": (h, h), pre + name + ".bias": (h,)})
    shapes.update({pre + "intermediate.dense.weight": (f, h), pre + "intermediate.dense.bias": (f,),
                   pre + "output.dense.weight": (h, f), pre + "output.dense.bias": (h,)})
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes.update({pre + name + ".weight": (h,), pre + name + ".bias": (h,)})
  return shapes


def mlm_head_shapes(config: EncoderConfig, dense: str, norm: str, bias: str) -> dict[str, tuple]:
  """Shapes of an MLM head's keys: dense hidden -> embedding width, its LayerNorm, the bias."""
  e = config.embed_dim
  return {dense + ".weight": (e, config.hidden_size), dense + ".bias": (e,),
          norm + ".weight": (e,), norm + ".bias": (e,), bias: (config.vocab_size,)}


class _Reader:
  """Takes tensors by name, checks shapes, and remembers what was never read."""

  def __init__(self, sd: dict, where: str):
    self.sd, self.where, self.unused = sd, where, set(sd)

  def check(self, key: str, shape: Optional[tuple] = None) -> None:
    """Raises unless tensor `key` exists (with `shape`); reads nothing and marks nothing used."""
    if key not in self.sd:
      raise ValueError(f"{self.where}: checkpoint is missing tensor {key!r}; it is not a complete "
                       "BERT/ELECTRA/RoBERTa encoder of the size its config.json declares.")
    if shape is not None and np.shape(self.sd[key]) != tuple(shape):
      raise ValueError(f"{self.where}: tensor {key!r} has shape {np.shape(self.sd[key])} but "
                       f"config.json implies {tuple(shape)}; the config and weights do not belong "
                       "together.")

  def take(self, key: str, shape: Optional[tuple] = None) -> np.ndarray:
    self.check(key, shape)
    self.unused.discard(key)
    return np.array(self.sd[key], dtype=np.float32)  # A copy: callers own the result.

  def linear(self, key, in_shape=None, out_shape=None):
    """HF Linear {weight [out, in], bias} -> our {kernel [in..., out...], bias [out...]}."""
    kernel, bias = self.take(key + ".weight").T, self.take(key + ".bias")
    if in_shape:
      kernel = kernel.reshape(in_shape + kernel.shape[1:])
    if out_shape:
      kernel, bias = kernel.reshape(kernel.shape[:-1] + out_shape), bias.reshape(out_shape)
    return {"kernel": np.ascontiguousarray(kernel), "bias": bias}

  def layer_norm(self, key):
    return {"scale": self.take(key + ".weight"), "bias": self.take(key + ".bias")}


def _normalise_keys(sd: dict, model_type: str) -> dict:
  """Encoder keys without their "<model_type>." prefix (bare BertModel saves have none)."""
  prefix = _KEY_PREFIX.get(model_type, model_type) + "."
  return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def from_state_dict(sd: dict, hf: dict, where: str = "checkpoint") -> Imported:
  """An `Imported` from a state dict and its config dict (see module docstring)."""
  config = encoder_config_from_hf(hf)
  model_type, offset = hf["model_type"], position_offset(hf)
  r = _Reader(_normalise_keys(sd, model_type), where)
  other = next((t for t in MODEL_TYPES if t != model_type and
                f"{t}.embeddings.word_embeddings.weight" in sd), None)
  if other and "embeddings.word_embeddings.weight" not in r.sd:
    raise ValueError(f"{where}: config.json has model_type {model_type!r}, but the tensors are a "
                     f"{other} model's ('{other}.' keys); set model_type to {other!r}.")
  tied = hf.get("tie_word_embeddings", True)
  enc, heads = (_modernbert_params(r, config, tied) if model_type == "modernbert"
                else (_bert_params(r, config, offset), _heads(r, config, tied)))
  left = sorted(k for k in r.unused if not any(k.startswith(p) or ("." + p) in k for p in _IGNORED))
  if left:
    raise ValueError(f"{where}: checkpoint has tensors this encoder cannot represent (is it "
                     f"really a {model_type} encoder?): {left[:8]}")
  return Imported(config, enc, heads, model_type, offset)


def _bert_params(r: "_Reader", config: EncoderConfig, offset: int) -> dict:
  """Encoder params of BERT / ELECTRA / RoBERTa tensors (keys without their prefix)."""
  for key, shape in expected_shapes(config).items():  # The first mismatch, before any reshape.
    r.check(key, shape)
  pos = r.take("embeddings.position_embeddings.weight")
  if pos.ndim != 2 or pos.shape[0] != config.max_len + offset or pos.shape[1] != config.embed_dim:
    raise ValueError(f"{r.where}: position embeddings have shape {pos.shape}, config.json implies "
                     f"({config.max_len + offset}, {config.embed_dim}).")
  emb = {name: {"embedding": r.take(f"embeddings.{name}.weight")}
         for name in ("word_embeddings", "token_type_embeddings")}
  emb["position_embeddings"] = {"embedding": np.ascontiguousarray(pos[offset:])}
  emb["LayerNorm"] = r.layer_norm("embeddings.LayerNorm")
  enc = {"embeddings": emb}
  if config.projects_embeddings:
    enc["embeddings_project"] = r.linear("embeddings_project")
  heads = (config.num_heads, config.head_dim)
  for i in range(config.num_layers):
    pre = f"encoder.layer.{i}."
    att = {name: r.linear(f"{pre}attention.self.{name}", out_shape=heads)
           for name in ("query", "key", "value")}
    att["output"] = r.linear(f"{pre}attention.output.dense", in_shape=heads)
    att["LayerNorm"] = r.layer_norm(f"{pre}attention.output.LayerNorm")
    enc[f"layer_{i}"] = {"attention": att, "intermediate": r.linear(f"{pre}intermediate.dense"),
                         "output": r.linear(f"{pre}output.dense"),
                         "LayerNorm": r.layer_norm(f"{pre}output.LayerNorm")}
  return enc


def _modernbert_params(r: "_Reader", config: EncoderConfig, tied: bool) -> tuple[dict, dict]:
  """Encoder params and heads of ModernBERT tensors (keys without "model."); bias-free layers
  have no bias params, as ours have none."""
  h, f, n, d = config.hidden_size, config.mlp_dim, config.num_heads, config.head_dim

  def linear(key, shape, kernel_shape=None, bias_shape=None, bias=config.use_bias):
    """A linear layer {kernel, bias}, or without kernel_shape a norm {scale, bias}."""
    w = r.take(key + ".weight", shape)
    out = ({"scale": w} if kernel_shape is None else
           {"kernel": np.ascontiguousarray(w.T.reshape(kernel_shape))})
    return {**out, **({"bias": r.take(key + ".bias", shape[:1]).reshape(bias_shape or shape[:1])}
                      if bias else {})}
  norm = lambda key: linear(key, (h,), bias=config.norm_bias)  # noqa: E731
  word = r.take("embeddings.tok_embeddings.weight", (config.vocab_size, h))
  enc = {"embeddings": {"word_embeddings": {"embedding": word}, "LayerNorm": norm("embeddings.norm")},
         "final_norm": norm("final_norm")}
  for i in range(config.num_layers):
    pre = f"layers.{i}."
    qkv = linear(pre + "attn.Wqkv", (3 * h, h), (h, 3, n, d), (3, n, d))
    att = {name: {k: np.ascontiguousarray(v[:, j] if k == "kernel" else v[j])
                  for k, v in qkv.items()} for j, name in enumerate(("query", "key", "value"))}
    att["output"] = linear(pre + "attn.Wo", (h, h), (n, d, h), (h,))
    enc[f"layer_{i}"] = {"attention": att, "mlp_norm": norm(pre + "mlp_norm"),
                         "intermediate": linear(pre + "mlp.Wi", (2 * f, h), (h, 2, f), (2, f)),
                         "output": linear(pre + "mlp.Wo", (h, f), (f, h), (h,)),
                         **({"attention_norm": norm(pre + "attn_norm")} if i else {})}
  heads = {}
  if "head.dense.weight" in r.sd and "classifier.weight" not in r.sd:  # not a task model's head
    heads["mlm_head"] = {"dense": linear("head.dense", (h, h), (h, h), (h,)),
                         "LayerNorm": norm("head.norm"),  # decoder_bias=false: a zero bias
                         "bias": (r.take("decoder.bias", (config.vocab_size,)) if "decoder.bias"
                                  in r.sd else np.zeros(config.vocab_size, np.float32))}
    _check_tied(r, "decoder.weight", "embeddings.tok_embeddings.weight", tied)
  return enc, heads


def _check_tied(r: "_Reader", decoder: str, word: str, tied: bool) -> None:
  """Our MLM head is tied to the word embeddings, so a decoder that differs from them, or none
  with `tied` false (which transformers would initialise at random), is an error."""
  if decoder in r.sd and not np.array_equal(r.sd[decoder], r.sd[word]):
    raise ValueError(f"{r.where}: {decoder} differs from the word embeddings; only tied "
                     "MLM heads are supported.")
  if decoder not in r.sd and not tied:
    raise ValueError(f"{r.where}: config.json sets tie_word_embeddings=false but the "
                     f"checkpoint has no {decoder}; only tied MLM heads are supported: "
                     "drop the setting if the head is tied.")


def _heads(r: _Reader, config: EncoderConfig, tied: bool) -> dict:
  """The pretraining heads present in the checkpoint, as our head params (MLM heads tied)."""
  heads = {}
  mlm = [("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
          ("cls.predictions.bias", "cls.predictions.decoder.bias"),
          "cls.predictions.decoder.weight"),
         ("generator_predictions.dense", "generator_predictions.LayerNorm",
          ("generator_lm_head.bias",), "generator_lm_head.weight"),
         ("lm_head.dense", "lm_head.layer_norm", ("lm_head.bias", "lm_head.decoder.bias"),
          "lm_head.decoder.weight")]
  for dense, norm, biases, decoder in mlm:
    if dense + ".weight" in r.sd:
      bias = next((b for b in biases if b in r.sd), biases[0])
      for key, shape in mlm_head_shapes(config, dense, norm, bias).items():
        r.check(key, shape)  # Shape errors before any reshape.
      heads["mlm_head"] = {"dense": r.linear(dense), "LayerNorm": r.layer_norm(norm),
                           "bias": r.take(bias)}
      for b in biases:
        r.unused.discard(b)
      _check_tied(r, decoder, "embeddings.word_embeddings.weight", tied)
  if "discriminator_predictions.dense.weight" in r.sd:
    heads["discriminator_head"] = {
        "dense": r.linear("discriminator_predictions.dense"),
        "dense_prediction": r.linear("discriminator_predictions.dense_prediction")}
  return heads


def read_hf_encoder(model_dir: str) -> Imported:
  """Reads a local BERT / ELECTRA / RoBERTa / ModernBERT directory written by us or by
  transformers."""
  hf = read_config(model_dir)
  where = os.path.join(model_dir, files.CONFIG_FILE)
  try:
    encoder_config_from_hf(hf)  # Architecture errors before reading any weights.
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  return from_state_dict(load_state_dict(model_dir), hf, model_dir)
