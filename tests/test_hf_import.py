"""Import of Hugging Face BERT / ELECTRA / RoBERTa directories, and export of every objective.

Held against transformers on PyTorch: the exports of every registered objective load there and
compute our hidden states, importing them gives back our parameters exactly, and third-party
models built by transformers (random weights) compute the same hidden states and head logits
after import. Broken inputs fail with messages that name the problem.
"""
import json
import os
import shutil
import sysconfig

import flax.linen as nn
import jax
import numpy as np
import pytest

from objectives import registry
from configs import demo
from objectives import detection
from pretrain import export
from pretrain.interop import hf_bert, hf_read
from pretrain.data import tokenizer as tokenizer_lib
from pretrain.models import encoder as enc
from pretrain.finetune import heads
from pretrain.interop import load
from tests.conftest import objective_resources

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

L = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  """A real (tiny) sentencepiece tokenizer: the export writes its files."""
  stdlib = sysconfig.get_paths()["stdlib"]
  texts = [open(os.path.join(stdlib, name), encoding="utf-8").read()
           for name in ("json/decoder.py", "json/encoder.py", "textwrap.py")]
  path = str(tmp_path_factory.mktemp("tok") / "spm.model")
  return tokenizer_lib.train(texts, path, vocab_size=400, num_threads=1)


def _random_params(objective, batch, seed):
  """Random values in the shapes `objective.init` gives (no init compiled: eval_shape only);
  LayerNorm scales near 1, everything else (biases too) small and nonzero."""
  shapes = nn.unbox(jax.eval_shape(lambda r: objective.init(r, batch), jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    offset = 1.0 if str(getattr(path[-1], "key", "")) == "scale" else 0.0
    return (offset + 0.05 * rng.standard_normal(s.shape)).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _batch(vocab, low=5, pad=0, seed=0):
  """Two rows of L ids in [low, vocab), the second padded after 11 tokens."""
  ids = np.random.default_rng(seed).integers(low, vocab, (2, L)).astype(np.int32)
  seg = np.ones_like(ids)
  ids[1, 11:], seg[1, 11:] = pad, 0
  pos = np.where(seg > 0, np.arange(L), 0).astype(np.int32)
  return ids, seg, pos


def _assert_same_tree(a, b):
  flat_a, flat_b = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=str(k))


@pytest.mark.parametrize("name", registry.NAMES)
def test_export_of_every_objective_imports_back_and_matches_transformers(name, tokenizer, tmp_path):
  config = demo.get_config(f"size=tiny,vocab_size={tokenizer.vocab_size},seq_len=32")
  config.model.max_len = 32
  config.objective.name = name
  objective = registry.build(config, tokenizer, objective_resources(config, tokenizer))
  batch = objective.example_batch(32)
  params = _random_params(objective, batch, seed=1)
  rows = [{"step": 7, "eval_loss": 1.5}]
  export.write_export(str(tmp_path), config, tokenizer, objective, params, 7, rows)

  with open(tmp_path / "config.json") as f:
    model_type = json.load(f)["model_type"]
  assert model_type == ("electra" if "discriminator_head" in params else "bert")
  card = (tmp_path / "README.md").read_text()
  assert f"`{name}`" in card and "steps: 7" in card and "eval_loss 1.5000" in card

  imported = hf_read.read_hf_encoder(str(tmp_path))  # import(export(params)) == params
  assert imported.config == objective.model_config
  _assert_same_tree(imported.encoder, objective.encoder(params))
  own_config, own_params = load.read_export(str(tmp_path))
  assert own_config == objective.model_config
  _assert_same_tree(own_params["encoder"], objective.encoder(params))
  if "discriminator_head" in params:
    _assert_same_tree(imported.heads["discriminator_head"], params["discriminator_head"])

  ids, seg, pos = _batch(tokenizer.vocab_size)
  ours = np.asarray(enc.Encoder(objective.model_config).apply(
      {"params": objective.encoder(params)}, ids, seg, pos))
  model = transformers.AutoModel.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  assert model.config.model_type == model_type
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(seg)).last_hidden_state.numpy()
  real = seg > 0
  assert np.abs(ours[real] - theirs[real]).max() < 1e-4


def _randomised(model, seed):
  """A transformers model with every parameter drawn at random (biases, LayerNorms included)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale_like = "LayerNorm.weight" in name or "layer_norm.weight" in name
      p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if scale_like else 0.0))
  return model.eval()


SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, hidden_act="gelu")


def _save(model, path):
  model.save_pretrained(str(path), safe_serialization=True)
  return str(path)


def _torch(x):
  return torch.tensor(np.asarray(x), dtype=torch.long)


def test_bert_import_matches_bert_for_masked_lm_with_token_types(tmp_path):
  cfg = transformers.BertConfig(**SMALL, max_position_embeddings=40, type_vocab_size=2)
  model = _randomised(transformers.BertForMaskedLM(cfg), 0)
  imported = hf_read.read_hf_encoder(_save(model, tmp_path))
  assert imported.model_type == "bert" and imported.position_offset == 0
  assert (imported.config.max_len, imported.config.type_vocab_size) == (40, 2)

  ids, seg, pos = _batch(99)
  types = (np.arange(L) >= 6).astype(np.int32)[None].repeat(2, 0) * seg  # A pair: b from 6 on.
  rows = {"input_ids": ids, "segment_ids": seg, "positions": pos, "token_types": types}
  hidden = np.asarray(heads.encode(imported.config, imported.encoder, rows, jax.random.key(0),
                                   False, True))
  logits = np.asarray(enc.MlmHead(imported.config).apply(
      {"params": imported.heads["mlm_head"]}, hidden,
      imported.encoder["embeddings"]["word_embeddings"]["embedding"]))
  with torch.no_grad():
    out = model(input_ids=_torch(ids), attention_mask=_torch(seg), token_type_ids=_torch(types),
                output_hidden_states=True)
  real = seg > 0
  assert np.abs(hidden[real] - out.hidden_states[-1].numpy()[real]).max() < 1e-4
  assert np.abs(logits[real] - out.logits.numpy()[real]).max() < 1e-4


def test_electra_import_with_narrow_embeddings_matches_electra_for_pretraining(tmp_path):
  cfg = transformers.ElectraConfig(**SMALL, embedding_size=16, max_position_embeddings=40)
  model = _randomised(transformers.ElectraForPreTraining(cfg), 1)
  imported = hf_read.read_hf_encoder(_save(model, tmp_path))
  assert imported.config.embedding_size == 16 and "embeddings_project" in imported.encoder
  ids, seg, pos = _batch(99)
  hidden = enc.Encoder(imported.config).apply({"params": imported.encoder}, ids, seg, pos)
  logits = detection.DiscriminatorHead(imported.config).apply(
      {"params": imported.heads["discriminator_head"]}, hidden)
  with torch.no_grad():
    out = model(input_ids=_torch(ids), attention_mask=_torch(seg), output_hidden_states=True)
  real = seg > 0
  assert np.abs(np.asarray(hidden)[real] - out.hidden_states[-1].numpy()[real]).max() < 1e-4
  assert np.abs(np.asarray(logits)[real] - out.logits.numpy()[real]).max() < 1e-4


def test_roberta_import_shifts_positions_and_matches_roberta_for_masked_lm(tmp_path):
  cfg = transformers.RobertaConfig(**SMALL, max_position_embeddings=42, type_vocab_size=1,
                                   pad_token_id=1, layer_norm_eps=1e-5)
  model = _randomised(transformers.RobertaForMaskedLM(cfg), 2)
  imported = hf_read.read_hf_encoder(_save(model, tmp_path))
  assert imported.position_offset == 2 and imported.config.max_len == 40
  hf_table = model.roberta.embeddings.position_embeddings.weight.detach().numpy()
  np.testing.assert_array_equal(
      imported.encoder["embeddings"]["position_embeddings"]["embedding"], hf_table[2:])
  ids, seg, pos = _batch(99, low=3, pad=1)  # RoBERTa derives positions from ids != pad (1).
  hidden = enc.Encoder(imported.config).apply({"params": imported.encoder}, ids, seg, pos)
  logits = enc.MlmHead(imported.config).apply(
      {"params": imported.heads["mlm_head"]}, hidden,
      imported.encoder["embeddings"]["word_embeddings"]["embedding"])
  with torch.no_grad():
    out = model(input_ids=_torch(ids), attention_mask=_torch(seg), output_hidden_states=True)
  real = seg > 0
  assert np.abs(np.asarray(hidden)[real] - out.hidden_states[-1].numpy()[real]).max() < 1e-4
  assert np.abs(np.asarray(logits)[real] - out.logits.numpy()[real]).max() < 1e-4


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  cfg = transformers.BertConfig(**SMALL, max_position_embeddings=40)
  return _save(_randomised(transformers.BertModel(cfg), 3), tmp_path_factory.mktemp("bert"))


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _edit_config(path, **changes):
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)


def test_corrupt_weights_fail_naming_the_file(bert_dir, tmp_path):
  path = _copy(bert_dir, tmp_path / "m")
  weights = os.path.join(path, "model.safetensors")
  with open(weights, "r+b") as f:
    f.truncate(os.path.getsize(weights) // 2)
  with pytest.raises(ValueError, match="model.safetensors: cannot read safetensors file .*corrupt"):
    hf_read.read_hf_encoder(path)
  os.remove(weights)
  with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
    f.write(b"\0")
  with pytest.raises(FileNotFoundError, match="only safetensors is read"):
    hf_read.read_hf_encoder(path)


@pytest.mark.parametrize("changes,message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported.*bert, electra, roberta"),
    (dict(hidden_act="relu"), "hidden_act 'relu'"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type 'relative_key'"),
    (dict(hidden_size=64), "has shape \\(99, 32\\) but config.json implies \\(99, 64\\)"),
    (dict(num_hidden_layers=3), "missing tensor 'encoder.layer.2"),
    (dict(num_hidden_layers=1), "cannot represent.*encoder.layer.1"),
])
def test_wrong_architecture_fails_with_a_clear_message(bert_dir, tmp_path, changes, message):
  path = _copy(bert_dir, tmp_path / "m")
  _edit_config(path, **changes)
  with pytest.raises(ValueError, match=message):
    hf_read.read_hf_encoder(path)


def test_load_encoder_reads_every_kind_of_init_and_rejects_others(bert_dir, tmp_path):
  pretrained = load.load_encoder(bert_dir)
  assert pretrained.source == "hf:bert" and pretrained.tokenizer_dir == bert_dir
  # Against transformers' own reading of the directory: our writer's names for our tensors.
  theirs = transformers.BertModel.from_pretrained(bert_dir).state_dict()
  assert (pretrained.config.num_layers, pretrained.config.hidden_size) == (
      SMALL["num_hidden_layers"], SMALL["hidden_size"])
  ours = hf_bert.encoder_state_dict(pretrained.encoder, pretrained.config, "bert")
  assert ours, "no tensors compared"
  for key, value in ours.items():
    np.testing.assert_array_equal(value, theirs[key.removeprefix("bert.")].numpy(), err_msg=key)
  with pytest.raises(FileNotFoundError, match="none of: a pretraining workdir"):
    load.load_encoder(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    load.load_encoder(str(tmp_path / "missing"))
