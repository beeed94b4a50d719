"""Export of replaced-token-detection objectives as Hugging Face ELECTRA directories.

  out_dir/            ElectraForPreTraining: the discriminator; AutoModel loads its ElectraModel,
                      the encoder to fine-tune (discriminator_predictions.* are then unused).
  out_dir/generator/  ElectraForMaskedLM: ELECTRA's generator (only when the params have one).

Each directory holds config.json + model.safetensors (float32, no pickle). The generator directory
carries its own copy of the shared embeddings, because Hugging Face models are loaded one at a
time. The tied ``generator_lm_head.weight`` is not written: transformers re-ties it to
``electra.embeddings.word_embeddings.weight`` on load, as it does for BERT's decoder.
Linear-layer conventions are those of `pretrain.interop.hf_bert`, whose converters and file
writer are reused.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from pretrain.interop import files, hf_bert
from pretrain.models.encoder import EncoderConfig


def hf_config(config: EncoderConfig, architecture: str) -> dict:
  """An ``ElectraConfig`` dict for config.json: BERT's fields plus the embedding width."""
  return {**hf_bert.hf_config(config), "model_type": "electra", "architectures": [architecture],
          "embedding_size": config.embed_dim}


def electra_model_state_dict(encoder_params: Any, config: EncoderConfig) -> dict[str, np.ndarray]:
  """``electra.*`` keys of an Encoder param tree (embeddings included) for `config`."""
  enc = hf_bert.plain(encoder_params)
  emb = enc["embeddings"]
  width = np.shape(emb["word_embeddings"]["embedding"])
  if width != (config.vocab_size, config.embed_dim):
    raise ValueError(f"word embeddings have shape {width}, but the config expects "
                     f"({config.vocab_size}, {config.embed_dim}) (vocab_size, embedding_size).")
  if ("embeddings_project" in enc) != config.projects_embeddings:
    raise ValueError(f"encoder params {'have' if 'embeddings_project' in enc else 'lack'} "
                     f"embeddings_project, which embedding_size={config.embedding_size} and "
                     f"hidden_size={config.hidden_size} contradict.")
  sd = hf_bert.encoder_state_dict(enc, config, "electra")
  if config.projects_embeddings:
    sd.update(hf_bert.linear(enc["embeddings_project"], "electra.embeddings_project"))
  return sd


def discriminator_state_dict(params: Any, config: EncoderConfig) -> dict[str, np.ndarray]:
  """ElectraForPreTraining keys from objective params {"encoder", "discriminator_head", ...}."""
  params = hf_bert.plain(params)
  sd = electra_model_state_dict(params["encoder"], config)
  head = params["discriminator_head"]
  sd.update(hf_bert.linear(head["dense"], "discriminator_predictions.dense"))
  sd.update(hf_bert.linear(head["dense_prediction"], "discriminator_predictions.dense_prediction"))
  return sd


def generator_state_dict(params: Any, generator_config: EncoderConfig) -> dict[str, np.ndarray]:
  """ElectraForMaskedLM keys: the shared embeddings, the generator encoder and its tied head."""
  params = hf_bert.plain(params)
  if "embeddings" in params["generator"]:
    raise ValueError("generator params have their own embeddings; ELECTRA's share the encoder's.")
  encoder = {"embeddings": params["encoder"]["embeddings"], **params["generator"]}
  sd = electra_model_state_dict(encoder, generator_config)
  head = params["generator_head"]
  sd.update(hf_bert.linear(head["dense"], "generator_predictions.dense"))
  sd.update(hf_bert.layer_norm(head["LayerNorm"], "generator_predictions.LayerNorm"))
  sd["generator_lm_head.bias"] = hf_bert.f32(head["bias"])
  return sd


def write_hf_electra(out_dir: str, params: Any, model_config: EncoderConfig,
                     generator_config: Optional[EncoderConfig] = None) -> None:
  """Writes the discriminator to `out_dir` and, if `params` has one, the generator below it."""
  params = hf_bert.plain(params)
  hf_bert.write_files(out_dir, discriminator_state_dict(params, model_config),
                      hf_config(model_config, "ElectraForPreTraining"))
  if "generator" in params:
    if generator_config is None:
      raise ValueError("params hold a generator: pass generator_config "
                       "(objective.generator_config)")
    hf_bert.write_files(os.path.join(out_dir, files.GENERATOR_DIR),
                        generator_state_dict(params, generator_config),
                        hf_config(generator_config, "ElectraForMaskedLM"))


def write_for_objective(out_dir: str, objective: Any, params: Any) -> None:
  """`write_hf_electra` for an objective with a discriminator head (electra, rts, crts)."""
  if "discriminator_head" not in hf_bert.plain(params):
    raise ValueError(f"{type(objective).__name__} has no discriminator head to export as "
                     "ELECTRA; export masked-LM objectives with pretrain.interop.hf_bert.")
  write_hf_electra(out_dir, params, objective.model_config,
                   objective.generator_config)
