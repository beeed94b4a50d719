"""Export to Hugging Face BERT is checked against the independent PyTorch implementation."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from pretrain.interop import hf_bert, hf_read
from pretrain.models.encoder import (Encoder, EncoderConfig, MlmHead, gather_positions,
                                     word_embedding_table)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CFG = EncoderConfig(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128,
                    max_len=24)
L = 12


def _perturbed_params(cfg=CFG, seed=0):
  """Random params with LayerNorm scales/biases and all biases far from 1/0."""
  enc, head = Encoder(cfg), MlmHead(cfg)
  ids = np.zeros((1, L), np.int32)
  enc_vars = enc.init(jax.random.key(seed), ids, ids + 1, np.arange(L)[None])
  enc_params = nn.meta.unbox(enc_vars)["params"]
  hid = np.zeros((1, L, cfg.hidden_size), np.float32)
  head_params = nn.meta.unbox(head.init(
      jax.random.key(seed + 1), hid, word_embedding_table(enc_params)))["params"]
  rng = np.random.default_rng(seed)

  def perturb(path, x):
    x = np.asarray(x)
    names = [getattr(k, "key", str(k)) for k in path]
    if names[-1] == "scale":
      return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    if names[-1] == "bias":
      return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    if names[-1] == "kernel" and names[-2] in ("query", "key"):
      # Sharper attention than at init, so masking mistakes would show.
      return (0.15 * rng.standard_normal(x.shape)).astype(np.float32)
    return (x + 0.02 * rng.standard_normal(x.shape)).astype(np.float32)

  return (jax.tree_util.tree_map_with_path(perturb, enc_params),
          jax.tree_util.tree_map_with_path(perturb, head_params))


def _ours(enc_params, head_params, ids_BL, seg_BL, pos_BL, cfg=CFG):
  hidden = Encoder(cfg).apply({"params": enc_params}, ids_BL, seg_BL, pos_BL)
  all_pos = np.broadcast_to(np.arange(ids_BL.shape[1]), ids_BL.shape)
  logits = MlmHead(cfg).apply({"params": head_params}, gather_positions(hidden, all_pos),
                              word_embedding_table(enc_params))
  return np.asarray(hidden), np.asarray(logits)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  enc_params, head_params = _perturbed_params()
  out_dir = str(tmp_path_factory.mktemp("hf_export"))
  hf_bert.write_hf_model(out_dir, enc_params, head_params, CFG)
  return out_dir, enc_params, head_params


def _load(cls, out_dir):
  model, info = cls.from_pretrained(out_dir, output_loading_info=True, dtype=torch.float32)
  return model.eval(), info


def test_masked_lm_parity(exported):
  out_dir, enc_params, head_params = exported
  model, info = _load(transformers.AutoModelForMaskedLM, out_dir)
  assert type(model).__name__ == "BertForMaskedLM"
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info["mismatched_keys"], info
  assert model.config.attention_probs_dropout_prob == 0.0

  rng = np.random.default_rng(1)
  ids = rng.integers(1, CFG.vocab_size, size=(2, L))
  # Case 1: one document per row, no padding.
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids)).logits.numpy()
  _, ours = _ours(enc_params, head_params, ids, np.ones_like(ids), np.tile(np.arange(L), (2, 1)))
  diff = np.abs(ours - ref).max()
  print(f"BertForMaskedLM logits max|diff| (no padding): {diff:.3g}")
  assert np.abs(ref).max() > 1.0  # Logits are not trivially small.
  assert diff < 1e-4

  # Case 2: right padding (HF attention_mask) vs our segment id 0 on padding.
  lengths = [L, 7]
  mask = (np.arange(L)[None] < np.array(lengths)[:, None]).astype(np.int64)
  padded = ids * mask
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(padded), attention_mask=torch.tensor(mask)).logits.numpy()
  _, ours = _ours(enc_params, head_params, padded, mask, np.tile(np.arange(L), (2, 1)) * mask)
  real = mask.astype(bool)
  diff = np.abs(ours[real] - ref[real]).max()
  print(f"BertForMaskedLM logits max|diff| (right padding, real positions): {diff:.3g}")
  assert diff < 1e-4


def test_base_model_parity(exported):
  out_dir, enc_params, head_params = exported
  model, info = _load(transformers.AutoModel, out_dir)
  assert type(model).__name__ == "BertModel"
  # Expected: we have no pooler, and the MLM head is not part of BertModel.
  assert {k.split(".")[0] for k in info["missing_keys"]} <= {"pooler"}, info
  assert {k.split(".")[0] for k in info["unexpected_keys"]} <= {"cls"}, info
  ids = np.random.default_rng(2).integers(1, CFG.vocab_size, size=(2, L))
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
  ours, _ = _ours(enc_params, head_params, ids, np.ones_like(ids), np.tile(np.arange(L), (2, 1)))
  diff = np.abs(ours - ref).max()
  print(f"BertModel last_hidden_state max|diff|: {diff:.3g}")
  assert diff < 1e-4


def test_packed_rows_match_documents_run_separately(exported):
  """A packed row equals HF run on each document on its own."""
  out_dir, enc_params, head_params = exported
  model, _ = _load(transformers.AutoModelForMaskedLM, out_dir)
  docs = [[3, 4, 5, 6, 7], [8, 9, 10, 11], [12, 13]]
  ids = np.array([sum(docs, []) + [0]])
  seg = np.array([[1] * 5 + [2] * 4 + [3] * 2 + [0]])
  pos = np.array([list(range(5)) + list(range(4)) + list(range(2)) + [0]])
  _, ours = _ours(enc_params, head_params, ids, seg, pos)
  start = 0
  for doc in docs:
    with torch.no_grad():
      ref = model(input_ids=torch.tensor([doc])).logits.numpy()[0]
    assert np.abs(ours[0, start:start + len(doc)] - ref).max() < 1e-4
    start += len(doc)


def test_round_trip_exact():
  enc_params, head_params = _perturbed_params(seed=5)
  sd = hf_bert.to_hf_state_dict(enc_params, head_params, CFG)
  assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in sd.values())
  imported = hf_read.from_state_dict(sd, hf_bert.hf_config(CFG))
  assert imported.config == CFG and set(imported.heads) == {"mlm_head"}
  for a, b in ((enc_params, imported.encoder), (head_params, imported.heads["mlm_head"])):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert x.shape == y.shape and np.array_equal(np.asarray(x), y)


def test_boxed_params_export_like_plain():
  enc_vars = Encoder(CFG).init(jax.random.key(0), np.zeros((1, 4), np.int32),
                               np.ones((1, 4), np.int32), np.arange(4)[None])
  boxed = hf_bert.to_hf_state_dict(enc_vars["params"], None, CFG)
  plain = hf_bert.to_hf_state_dict(nn.meta.unbox(enc_vars)["params"], None, CFG)
  assert boxed.keys() == plain.keys() and not any(k.startswith("cls.") for k in boxed)
  assert all(np.array_equal(boxed[k], plain[k]) for k in boxed)


def test_reads_transformers_checkpoints(tmp_path):
  """Checkpoints saved by transformers itself (with and without 'bert.', MLM or base)."""
  hf_cfg = transformers.BertConfig(**{k: v for k, v in hf_bert.hf_config(CFG).items()
                                      if k not in ("architectures", "model_type")})
  mlm = transformers.BertForMaskedLM(hf_cfg).eval()
  mlm.save_pretrained(tmp_path / "mlm")
  imported = hf_read.read_hf_encoder(str(tmp_path / "mlm"))
  assert imported.config == CFG and set(imported.heads) == {"mlm_head"}
  enc, head = imported.encoder, imported.heads["mlm_head"]
  ids = np.random.default_rng(3).integers(1, CFG.vocab_size, size=(1, L))
  with torch.no_grad():
    ref = mlm(input_ids=torch.tensor(ids)).logits.numpy()
  _, ours = _ours(enc, head, ids, np.ones_like(ids), np.arange(L)[None])
  assert np.abs(ours - ref).max() < 1e-4

  mlm.bert.save_pretrained(tmp_path / "base")  # Keys without "bert.", with a pooler.
  base = hf_read.read_hf_encoder(str(tmp_path / "base"))
  assert base.config == CFG and not base.heads
  assert jax.tree.structure(enc) == jax.tree.structure(base.encoder)
  assert all(np.array_equal(x, y)
             for x, y in zip(jax.tree.leaves(enc), jax.tree.leaves(base.encoder)))


def test_corrupt_weights_error(exported, tmp_path):
  out_dir, _, _ = exported
  (tmp_path / "config.json").write_text(open(f"{out_dir}/config.json").read())
  data = open(f"{out_dir}/model.safetensors", "rb").read()
  (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors"):
    hf_read.read_hf_encoder(str(tmp_path))
  (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
  with pytest.raises(ValueError, match=r"model\.safetensors"):
    hf_read.read_hf_encoder(str(tmp_path))
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
    hf_read.read_hf_encoder(str(tmp_path))


def test_config_errors(exported, tmp_path):
  out_dir, _, _ = exported
  cfg = json.load(open(f"{out_dir}/config.json"))
  (tmp_path / "model.safetensors").write_bytes(open(f"{out_dir}/model.safetensors", "rb").read())
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="roberta")))
  with pytest.raises(ValueError, match=r"model_type 'roberta', but the tensors are a bert model's "
                                       r"\('bert\.' keys\); set model_type to 'bert'"):
    hf_read.read_hf_encoder(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
  with pytest.raises(ValueError, match=r"config\.json: model_type 'gpt2' is not supported"):
    hf_read.read_hf_encoder(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
    hf_read.read_hf_encoder(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, hidden_act="gelu_new")))
  with pytest.raises(ValueError, match="hidden_act"):
    hf_read.read_hf_encoder(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps(dict(cfg, hidden_size=32)))
  with pytest.raises(ValueError, match=r"has shape \(97, 64\) but config\.json implies \(97, 32\)"):
    hf_read.read_hf_encoder(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"config\.json"):
    hf_read.read_hf_encoder(str(tmp_path / "missing"))


def test_missing_and_unexpected_keys():
  enc_params, head_params = _perturbed_params()
  sd = hf_bert.to_hf_state_dict(enc_params, head_params, CFG)
  hf = hf_bert.hf_config(CFG)
  broken = dict(sd)
  del broken["bert.encoder.layer.1.output.dense.bias"]
  with pytest.raises(ValueError, match="missing tensor 'encoder.layer.1.output.dense.bias'"):
    hf_read.from_state_dict(broken, hf)
  with pytest.raises(ValueError, match="cannot represent"):
    hf_read.from_state_dict(dict(sd, **{"bert.encoder.layer.2.output.dense.bias": sd[
        "bert.encoder.layer.1.output.dense.bias"]}), hf)
  untied = dict(sd, **{"cls.predictions.decoder.weight":
                       sd["bert.embeddings.word_embeddings.weight"] + 1})
  with pytest.raises(ValueError, match="tied"):
    hf_read.from_state_dict(untied, hf)
  with pytest.raises(ValueError, match="tie_word_embeddings=false but the checkpoint has no "
                                       "cls.predictions.decoder.weight"):
    hf_read.from_state_dict(sd, dict(hf, tie_word_embeddings=False))
