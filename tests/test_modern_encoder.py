"""The encoder's ModernBERT options: parity with transformers' ModernBertForMaskedLM both ways,
what each option changes, local attention inside packed segments, the padded vocabulary, the
config keys, the export's choice of architecture and one train step of every objective."""
import dataclasses
import json
import os
import sysconfig
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from objectives import electra, registry
from pretrain import export
from pretrain.data import tokenizer as tokenizer_lib
from pretrain.interop import hf_modernbert, hf_read, load, sentence_transformers as st_export
from pretrain.models import attention, encoder as enc, encoder_config
from pretrain.training import state as state_lib
from tests.conftest import fake_tokenizer, make_tiny_config, objective_resources, packed_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, L, H = 100, 32, 64
# Every ModernBERT option, a window small enough to matter at L = 32, a padded vocabulary.
MODERN = dict(position="rope", rope_theta=160000.0, rope_local_theta=10000.0, mlp="geglu",
              pre_norm=True, norm_bias=False, use_bias=False, type_vocab_size=0,
              layer_norm_eps=1e-5, local_window=8, global_every=3, mlm_head="modernbert")
CFG = enc.EncoderConfig(vocab_size=V, hidden_size=H, num_layers=3, num_heads=4, mlp_dim=96,
                        max_len=64, dropout_rate=0.0, vocab_multiple=16, **MODERN)


def _rows(vocab=V, seed=0):
  """Two rows: one document of L tokens, and one of 20 tokens then padding."""
  ids = np.random.default_rng(seed).integers(5, vocab, (2, L)).astype(np.int32)
  seg = np.ones_like(ids)
  ids[1, 20:], seg[1, 20:] = 0, 0
  return ids, seg, np.where(seg > 0, np.arange(L), 0).astype(np.int32)


def _noise(path, x, scale=0.05):
  """x plus noise that depends only on the parameter's path: models that share a parameter get
  the same values, so an option's effect is all that differs; norm scales stay near 1."""
  key = jax.tree_util.keystr(path)
  rng = np.random.default_rng(zlib.crc32(key.encode()))
  return (np.asarray(x) + scale * rng.standard_normal(np.shape(x))).astype(np.float32)


def _params(cfg, ids, seg, pos):
  """(encoder, MLM head) params of `cfg`, every value (biases, norms) moved off its init."""
  e = nn.meta.unbox(enc.Encoder(cfg).init(jax.random.key(0), ids, seg, pos))["params"]
  hidden = np.zeros((1, 2, cfg.hidden_size), np.float32)
  h = nn.meta.unbox(enc.MlmHead(cfg).init(jax.random.key(1), hidden,
                                          enc.word_embedding_table(e)))["params"]
  return (jax.tree_util.tree_map_with_path(_noise, e), jax.tree_util.tree_map_with_path(_noise, h))


def _logits(cfg, enc_params, head_params, ids, seg, pos):
  hidden = enc.Encoder(cfg).apply({"params": enc_params}, ids, seg, pos)
  return np.asarray(enc.MlmHead(cfg).apply({"params": head_params}, hidden,
                                           enc.word_embedding_table(enc_params)))


def _torch_logits(model_dir, ids, seg, attn="eager"):
  model = transformers.AutoModelForMaskedLM.from_pretrained(
      model_dir, attn_implementation=attn, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(seg)).logits.numpy(), model


def _max_diffs(ours, theirs, seg):
  """max |diff| over the unpadded row and over the real tokens of the padded row."""
  real = seg[1] > 0
  return (float(np.abs(ours[0] - theirs[0]).max()),
          float(np.abs(ours[1, real] - theirs[1, real]).max()))


# --- Parity with transformers ------------------------------------------------------------------

@pytest.mark.parametrize("act,bias", [("gelu", False), ("silu", True)])
def test_transformers_modernbert_imports_with_the_same_logits(tmp_path, act, bias):
  hf_config = transformers.ModernBertConfig(
      vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=64, local_attention=8,
      hidden_activation=act, attention_bias=bias, mlp_bias=bias, classifier_bias=bias,
      norm_bias=bias, pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2,
      sep_token_id=3)
  model = transformers.ModernBertForMaskedLM(hf_config)
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if "norm.weight" in name else 0.0))
  model.save_pretrained(str(tmp_path))
  imported = hf_read.read_hf_encoder(str(tmp_path))
  cfg = imported.config
  assert imported.model_type == "modernbert" and set(imported.heads) == {"mlm_head"}
  assert (cfg.mlp, cfg.use_bias, cfg.norm_bias) == (("geglu" if act == "gelu" else "swiglu"),
                                                    bias, bias)
  assert (cfg.local_window, cfg.global_every, cfg.rope_theta) == (8, 3, 160000.0)
  ids, seg, pos = _rows()
  ours = _logits(cfg, imported.encoder, imported.heads["mlm_head"], ids, seg, pos)
  theirs, _ = _torch_logits(str(tmp_path), ids, seg, attn="sdpa")
  assert max(_max_diffs(ours, theirs, seg)) < 1e-4
  # The window matters at this length: all-global attention gives other logits.
  wide = dataclasses.replace(cfg, local_window=0)
  assert np.abs(_logits(wide, imported.encoder, imported.heads["mlm_head"], ids, seg, pos)
                - ours).max() > 1e-3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("modernbert"))
  ids, seg, pos = _rows()
  enc_params, head_params = _params(CFG, ids, seg, pos)
  hf_modernbert.write_hf_model(out, enc_params, head_params, CFG)
  return out, enc_params, head_params


def test_export_loads_in_transformers_with_the_same_logits(exported):
  out, enc_params, head_params = exported
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  assert written["vocab_size"] == 112 and written["layer_types"] == [
      "full_attention", "sliding_attention", "sliding_attention"]
  ids, seg, pos = _rows()
  ours = _logits(CFG, enc_params, head_params, ids, seg, pos)
  theirs, model = _torch_logits(out, ids, seg)
  assert type(model).__name__ == "ModernBertForMaskedLM"
  assert ours.shape == (2, L, V) and theirs.shape == (2, L, 112)
  assert max(_max_diffs(ours, theirs[..., :V], seg)) < 1e-4
  assert theirs[..., V:].max() < -1000  # Padded rows: never predicted there either.
  # Read back: the same encoder, and the head but for the padded rows' bias.
  imported = hf_read.read_hf_encoder(out)
  assert imported.config == hf_modernbert.unpadded_view(CFG)
  for a, b in zip(jax.tree.leaves(imported.encoder), jax.tree.leaves(enc_params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(imported.heads["mlm_head"]["bias"][:V], head_params["bias"][:V])


# --- Options -----------------------------------------------------------------------------------

BASE = enc.EncoderConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=48,
                         max_len=L, dropout_rate=0.0, global_every=2)


@pytest.mark.parametrize("option", [
    dict(position="rope"), dict(mlp="geglu"), dict(mlp="swiglu"), dict(pre_norm=True),
    dict(norm="rmsnorm"), dict(norm_bias=False), dict(use_bias=False), dict(type_vocab_size=0),
    dict(local_window=4), dict(mlm_head="modernbert", norm_bias=False)],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_each_option_changes_the_output_and_keeps_the_shapes(option):
  ids, seg, pos = _rows()
  cfg = dataclasses.replace(BASE, **option)
  base = _logits(BASE, *_params(BASE, ids, seg, pos), ids, seg, pos)
  changed = _logits(cfg, *_params(cfg, ids, seg, pos), ids, seg, pos)
  assert changed.shape == base.shape == (2, L, V) and np.isfinite(changed).all()
  if "mlm_head" in option:  # The head's own norm: compare with the BERT head over this encoder.
    bert_head = dataclasses.replace(cfg, mlm_head="bert")
    base = _logits(bert_head, _params(cfg, ids, seg, pos)[0], _params(bert_head, ids, seg, pos)[1],
                   ids, seg, pos)
  assert np.abs(changed - base).max() > 1e-3


def test_a_local_layer_sees_its_window_inside_its_segment_only():
  cfg = dataclasses.replace(CFG, local_window=4)  # |i - j| <= 2
  seg = np.array([[1] * 6 + [2] * 5 + [0] * 3])
  pos = np.where(seg == 2, np.arange(14) - 6, np.arange(14))
  pos = np.where(seg == 0, np.arange(14) - 11, pos)
  mask = attention.window_mask(attention.segment_mask(seg), pos, cfg.local_window)
  layer = enc.EncoderLayer(cfg, 1)  # i % global_every != 0: a local layer
  x = np.random.default_rng(0).normal(size=(1, 14, H)).astype(np.float32)
  variables = layer.init(jax.random.key(0), x, mask, pos, deterministic=True)
  f = lambda x_LH: layer.apply(variables, x_LH[None], mask, pos, deterministic=True)[0]  # noqa: E731
  dep = np.asarray(jnp.abs(jax.jit(jax.jacfwd(f))(jnp.asarray(x[0]))).max(axis=(1, 3)))
  visible = (seg[0][:, None] == seg[0][None, :]) & (np.abs(pos[0][:, None] - pos[0][None]) <= 2)
  assert (dep[visible] > 1e-6).all() and (dep[~visible] == 0).all()
  assert not visible[0, 3] and not visible[5, 6]  # beyond the window; across documents


def test_the_encoder_never_attends_across_packed_documents():
  ids, seg, pos = packed_batch(np.random.default_rng(0), 2, L, V).values()
  enc_params, _ = _params(CFG, ids, seg, pos)
  other = ids.copy()
  other[:, L // 2:] = np.random.default_rng(1).integers(5, V, (2, L - L // 2))
  run = lambda i: np.asarray(enc.Encoder(CFG).apply({"params": enc_params}, i, seg, pos))  # noqa: E731
  a, b = run(ids), run(other)
  np.testing.assert_array_equal(a[:, :L // 2], b[:, :L // 2])  # document 1 ignores document 2
  assert np.abs(a[:, L // 2:] - b[:, L // 2:]).max() > 1e-3
  assert [CFG.is_global(i) for i in range(3)] == [True, False, False]


def test_padded_vocabulary_rows_are_never_predicted_or_sampled():
  ids, seg, pos = _rows()
  enc_params, head_params = _params(CFG, ids, seg, pos)
  assert enc.word_embedding_table(enc_params).shape == (112, H)
  head_params = {**head_params, "bias": np.where(np.arange(112) >= V, 1e6, 0.0)}  # adversarial
  logits = _logits(CFG, enc_params, head_params, ids, seg, pos)
  assert logits.shape[-1] == V and logits.argmax(-1).max() < V
  gen_cfg = electra.generator_config(CFG, 0.5)  # ELECTRA's generator keeps the padding
  assert gen_cfg.padded_vocab_size == 112 and gen_cfg.position == "rope"
  samples = electra.gumbel_max_sample(jax.random.key(0), jnp.asarray(logits))
  assert int(samples.max()) < V


# --- Config keys, export, objectives -----------------------------------------------------------

def test_config_keys_reach_the_encoder_config_and_are_checked(tiny_config):
  assert (common.POSITIONS, common.MLPS, common.NORMS, common.MLM_HEADS) == (
      encoder_config.POSITIONS, encoder_config.MLPS, encoder_config.NORMS,
      encoder_config.MLM_HEADS)
  assert registry.encoder_config(tiny_config.model, 500) == enc.EncoderConfig(
      vocab_size=500, hidden_size=64, num_layers=2, num_heads=2, mlp_dim=256,
      dropout_rate=tiny_config.model.dropout_rate)  # BERT's architecture by default
  tiny_config.model.update(MODERN, vocab_multiple=64)
  cfg = registry.encoder_config(common.validate(tiny_config).model, 500)
  assert {k: getattr(cfg, k) for k in MODERN} == MODERN and cfg.padded_vocab_size == 512
  for key, value, message in [("mlp", "relu", "allowed: gelu, geglu, swiglu"),
                              ("local_window", -1, ">= 0"), ("vocab_multiple", 0, "positive")]:
    bad = make_tiny_config()
    bad.model[key] = value
    with pytest.raises(ValueError, match=f"model.{key}.*{message}"):
      common.validate(bad)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  stdlib = sysconfig.get_paths()["stdlib"]
  texts = [open(os.path.join(stdlib, name), encoding="utf-8").read()
           for name in ("json/decoder.py", "json/encoder.py", "textwrap.py")]
  return tokenizer_lib.train(texts, str(tmp_path_factory.mktemp("tok") / "spm.model"),
                             vocab_size=400, num_threads=1)


def _objective(tokenizer, name="mlm", **model):
  config = make_tiny_config()
  config.model.update(MODERN, max_len=32, dropout_rate=0.0, **model)
  config.data.tokenizer.vocab_size = tokenizer.vocab_size
  config.objective.name = name
  return config, registry.build(common.validate(config), tokenizer)


def test_export_writes_modernbert_and_sentence_transformers_loads_it(tokenizer, tmp_path):
  config, objective = _objective(tokenizer, vocab_multiple=64)
  ids, seg, pos = _rows(tokenizer.vocab_size)
  params = dict(zip(("encoder", "mlm_head"), _params(objective.model_config, ids, seg, pos)))
  export.write_export(str(tmp_path), config, tokenizer, objective, params, 3, [])
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["architectures"] == ["ModernBertForMaskedLM"]
  assert "(ModernBERT)" in (tmp_path / "README.md").read_text()
  assert load.load_encoder(str(tmp_path)).config == objective.model_config  # fine-tuning
  imported = hf_read.read_hf_encoder(str(tmp_path))  # what init_from reads from this directory
  assert imported.config.vocab_size == 448 and imported.model_type == "modernbert"
  for name in ("encoder", "mlm_head"):  # the shapes warm starting this run's config needs
    state_lib.check_same_shapes({**imported.heads, "encoder": imported.encoder}[name],
                                params[name], name)
  st = pytest.importorskip("sentence_transformers")
  model = st.SentenceTransformer(str(tmp_path), device="cpu", local_files_only=True)
  texts = ["def add(a, b):\n    return a + b\n", "x = 1"]
  theirs = model.encode(texts, convert_to_numpy=True)
  ours = st_export.embed(params["encoder"], objective.model_config, tokenizer, texts,
                         max_seq_length=32)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def _random(objective):
  shapes = nn.unbox(jax.eval_shape(lambda r: objective.init(r, objective.example_batch(32)),
                                   jax.random.key(0)))
  return jax.tree_util.tree_map_with_path(lambda p, s: _noise(p, np.ones(s.shape) * (
      jax.tree_util.keystr(p).endswith("['scale']"))), shapes)


def test_export_of_a_detector_is_a_modernbert_encoder(tokenizer, tmp_path):
  config, objective = _objective(tokenizer, "rts")
  params = _random(objective)
  export.write_export(str(tmp_path), config, tokenizer, objective, params, 3, [])
  model = transformers.AutoModel.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  assert type(model).__name__ == "ModernBertModel"
  assert "detector head is only in the Flax params" in (tmp_path / "README.md").read_text()
  ids, seg, pos = _rows(tokenizer.vocab_size)
  ours = np.asarray(enc.Encoder(objective.model_config).apply({"params": params["encoder"]},
                                                              ids, seg, pos))
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(seg)).last_hidden_state.numpy()
  assert max(_max_diffs(ours, theirs, seg)) < 1e-4


def test_export_of_options_no_architecture_holds_is_flax_only(tokenizer, tmp_path):
  config, objective = _objective(tokenizer, norm="rmsnorm")
  export.write_export(str(tmp_path), config, tokenizer, objective, _random(objective), 3, [])
  assert not (tmp_path / "config.json").exists() and not (tmp_path / "modules.json").exists()
  card = (tmp_path / "README.md").read_text()
  assert "No Hugging Face architecture holds these options" in card and "norm='rmsnorm'" in card
  assert load.load_encoder(str(tmp_path)).config == objective.model_config


def _batch(objective, rng):
  """Packed rows for every feature the objective reads (ERNIE-Gram: no n-gram units)."""
  packed = packed_batch(rng, 4, 32, 500)
  batch = {k: packed.get(k, np.ones_like(packed["input_ids"])) for k in objective.features}
  if "ngram_ids" in batch:
    batch["ngram_ids"] = np.zeros_like(packed["input_ids"])
  return batch


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_objective_has_finite_loss_and_gradients_with_the_modern_encoder(name):
  """A training step's loss and gradients (no optimizer: its compile would double the cost)."""
  config = make_tiny_config()
  config.model.update(MODERN, vocab_multiple=64)  # 2 layers: 0 global, 1 local
  config.objective.update(name=name, ngram_vocab_size=50, components="mlm:1,rts:1")
  resources = objective_resources(config, fake_tokenizer(500))
  objective = registry.build(common.validate(config), fake_tokenizer(500), resources)
  params = _random(objective)
  grad = jax.jit(jax.value_and_grad(lambda p, b, r: objective.loss(
      p, objective.init_state(), b, r, train=True)[0]))
  loss, grads = grad(params, _batch(objective, np.random.default_rng(0)), jax.random.key(1))
  assert np.isfinite(float(loss)) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  kernel = grads["encoder"]["layer_1"]["intermediate"]["kernel"]  # the local layer's GeGLU
  assert kernel.shape == (64, 2, 256) and np.abs(kernel).max() > 0
