"""Sentence embeddings from our encoder, and a sentence-transformers directory that reproduces them.

A sentence-transformers directory is a Hugging Face model directory (config.json, weights,
tokenizer) plus a few JSON files that name the modules applied after the transformer:

  modules.json                 Transformer (path "") -> Pooling (1_Pooling) [-> Normalize]
  sentence_bert_config.json    max_seq_length (longer inputs are truncated)
  1_Pooling/config.json        which pooling: [CLS] state, mean or max over the attended tokens
  config_sentence_transformers.json  the similarity function (cosine, or dot when unnormalised)

We write the classic layout (module types `sentence_transformers.models.*`, the four
`pooling_mode_*` keys) because every sentence-transformers release from 2.x to 6.x reads it, and
only JSON: the export needs no sentence-transformers install. `embed` computes the same
embeddings with our Flax encoder, so a test can hold the two to 1e-4.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from pretrain.interop import hf_bert, hf_modernbert
from pretrain.data import hf_tokenizer
from pretrain.models import encoder as enc, pooling as pooling_lib


def tokenize(tokenizer, texts, max_seq_length):
  """(input_ids, segment_ids, positions) [N, L]: one "[CLS] text [SEP]" per row, right-padded.

  Text beyond max_seq_length - 2 tokens is cut, like the HF tokenizer's truncation; L is the
  longest row rounded up to a multiple of 8, so batches of similar lengths share one compilation.
  """
  rows = [[tokenizer.cls_id, *ids[:max_seq_length - 2], tokenizer.sep_id]
          for ids in tokenizer.encode_batch(list(texts))]
  length = -(-max(len(r) for r in rows) // 8) * 8
  ids = np.full((len(rows), length), tokenizer.pad_id, np.int32)
  segments = np.zeros_like(ids)
  for i, row in enumerate(rows):
    ids[i, :len(row)], segments[i, :len(row)] = row, 1
  positions = np.where(segments > 0, np.arange(length, dtype=np.int32), 0)
  return ids, segments, positions


@functools.partial(jax.jit, static_argnames=("config", "pooling", "normalize"))
def _embed_batch(params, ids_BL, seg_BL, pos_BL, *, config, pooling, normalize):
  hidden_BLH = enc.Encoder(config).apply({"params": params}, ids_BL, seg_BL, pos_BL)
  # sentence-transformers' Pooling divides by max(count, 1e-9); its Normalize is torch's.
  x_BH = pooling_lib.pool(hidden_BLH.astype(jnp.float32), seg_BL, pooling)
  return pooling_lib.l2_normalize(x_BH, eps=1e-12) if normalize else x_BH


def embed(encoder_params, model_config, tokenizer, texts, *, pooling="mean", normalize=True,
          max_seq_length=None, batch_size=32):
  """float32 [N, H] embeddings of `texts` by our encoder: what the exported directory gives."""
  max_seq_length = max_seq_length or model_config.max_len
  texts = list(texts)
  if not texts:
    return np.zeros((0, model_config.hidden_size), np.float32)
  out = [np.asarray(_embed_batch(encoder_params, *tokenize(tokenizer, texts[i:i + batch_size],
                                                             max_seq_length),
                                 config=model_config, pooling=pooling, normalize=normalize))
         for i in range(0, len(texts), batch_size)]
  return np.concatenate(out)


def _write_json(path, content):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(content, f, indent=2)
    f.write("\n")


def write_module_files(out_dir, hidden_size, *, pooling="mean", normalize=True,
                       max_seq_length=512):
  """The sentence-transformers files around an existing Hugging Face model directory."""
  pooling_lib.check(pooling)
  modules = [
      {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
  ]
  if normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
    os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)  # Normalize has no files.
  _write_json(os.path.join(out_dir, "modules.json"), modules)
  _write_json(os.path.join(out_dir, "sentence_bert_config.json"),
              {"max_seq_length": max_seq_length, "do_lower_case": False})
  _write_json(os.path.join(out_dir, "1_Pooling", "config.json"), {
      "word_embedding_dimension": hidden_size,
      "pooling_mode_cls_token": pooling == "cls",
      "pooling_mode_mean_tokens": pooling == "mean",
      "pooling_mode_max_tokens": pooling == "max",
      "pooling_mode_mean_sqrt_len_tokens": False})
  # Unnormalised embeddings are meant for dot-product scores (Contriever); normalised ones are
  # compared by cosine (the same ranking as dot).
  _write_json(os.path.join(out_dir, "config_sentence_transformers.json"), {
      "prompts": {}, "default_prompt_name": None,
      "similarity_fn_name": "cosine" if normalize else "dot"})


def read_pooling(model_dir):
  """"cls", "max" or "mean" from a 1_Pooling/config.json (ours or sentence-transformers'), None if
  there is none."""
  path = os.path.join(model_dir, "1_Pooling", "config.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    cfg = json.load(f)
  if cfg.get("pooling_mode_cls_token"):
    return "cls"
  return "max" if cfg.get("pooling_mode_max_tokens") else "mean"


def pooling_for(objective, pooling=None, normalize=None):
  """(pooling, normalize) for an export, or None when sentence-transformers cannot reproduce it.

  Explicit values win. Otherwise an objective that trains with a pooler (a `pooler_config`
  attribute, e.g. contrastive) exports the pooling and normalisation it trained with; a trainable
  pooler (latent, multilayer) or a projection has no sentence-transformers module here, so nothing
  is written rather than embeddings that differ from training. Objectives without one (MLM,
  ELECTRA...) get mean pooling with L2 normalisation, all-MiniLM-L6-v2's convention.
  """
  trained = objective.pooler_config
  if trained is None:
    return pooling or "mean", True if normalize is None else normalize
  if pooling is None and (trained.kind not in pooling_lib.MODES or trained.projection_dim):
    return None
  return pooling or trained.kind, trained.normalize if normalize is None else normalize


def write(out_dir, encoder_params, model_config, tokenizer, *, pooling="mean", normalize=True,
          max_seq_length=None, mlm_head_params=None):
  """A directory that `SentenceTransformer(out_dir)` loads offline and that embeds like `embed`.

  The transformer is our Hugging Face BERT export (BertModel, or BertForMaskedLM with
  `mlm_head_params`), or with ModernBERT's options our ModernBERT export (ModernBertModel /
  ModernBertForMaskedLM); the tokenizer is ours or the third-party one we trained with.
  """
  max_seq_length = max_seq_length or model_config.max_len
  if not 2 < max_seq_length <= model_config.max_len:
    raise ValueError(f"max_seq_length {max_seq_length} must be in (2, {model_config.max_len}] "
                     "(the encoder's position embeddings).")
  architecture, why = hf_modernbert.hf_architecture(model_config)
  if architecture is None:
    raise ValueError(f"sentence-transformers loads a Hugging Face model, and none holds this "
                     f"encoder ({why}).")
  if architecture == "modernbert":
    hf_modernbert.write_hf_model(out_dir, encoder_params, mlm_head_params, model_config)
  else:
    hf_bert.write_hf_model(out_dir, encoder_params,
                           hf_modernbert.padded_head(mlm_head_params, model_config),
                           hf_modernbert.unpadded_view(model_config))
  hf_tokenizer.save_hf(tokenizer, out_dir, model_max_length=max_seq_length)
  write_module_files(out_dir, model_config.hidden_size, pooling=pooling, normalize=normalize,
                     max_seq_length=max_seq_length)
  return out_dir
