"""The sentence-transformers export embeds exactly like our encoder (checked with the library itself)."""
import json
import os
import sysconfig
import types

import flax.linen as nn
import jax
import numpy as np
import pytest

from pretrain.interop import sentence_transformers as st_export
from pretrain.data import tokenizer as tok_lib
from pretrain.models import pooling
from pretrain.models.encoder import Encoder, EncoderConfig

sentence_transformers = pytest.importorskip("sentence_transformers")

CFG = EncoderConfig(vocab_size=500, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                    max_len=64)
TEXTS = ["def add(a, b):\n    return a + b\n", "x = 1", "",
         "import os\n" * 40,  # Longer than max_seq_length: both sides must truncate alike.
         "class Point:\n    '''A point.'''\n    x: int = 0\n"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  stdlib = sysconfig.get_paths()["stdlib"]
  texts = []
  for name in ("textwrap.py", "glob.py", "shlex.py", "heapq.py"):
    with open(os.path.join(stdlib, name), encoding="utf-8") as f:
      texts.append(f.read())
  return tok_lib.train(texts, str(tmp_path_factory.mktemp("spm") / "spm.model"), CFG.vocab_size)


@pytest.fixture(scope="module")
def params():
  """Random encoder params with LayerNorms and biases moved off 1/0, so mistakes would show."""
  ids = np.zeros((1, 8), np.int32)
  tree = nn.meta.unbox(Encoder(CFG).init(jax.random.key(0), ids, ids + 1, np.arange(8)[None]))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32),
                      tree["params"])


def test_pool_closed_forms():
  hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
  mask = np.array([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_allclose(pooling.pool(hidden, mask, "cls"), [[0, 1], [6, 7]])
  np.testing.assert_allclose(pooling.pool(hidden, mask, "mean"), [[1, 2], [6, 7]])
  # Max over the tokens only: the padding's larger values (4, 5 and 8..11) never win.
  np.testing.assert_allclose(pooling.pool(hidden, mask, "max"), [[2, 3], [6, 7]])
  np.testing.assert_allclose(pooling.pool(-hidden, mask, "max"), [[0, -1], [-6, -7]])
  np.testing.assert_allclose(pooling.l2_normalize(np.array([[3.0, 4.0]])), [[0.6, 0.8]])
  with pytest.raises(ValueError, match="Unknown pooling 'sum'; allowed: cls, mean, max"):
    pooling.pool(hidden, mask, "sum")


def _pooled(kind, normalize=False, projection_dim=0):
  """An objective that trains with a pooler, as far as the export reads it."""
  return types.SimpleNamespace(pooler_config=types.SimpleNamespace(
      kind=kind, normalize=normalize, projection_dim=projection_dim))


@pytest.mark.parametrize("objective,explicit,expected", [
    (types.SimpleNamespace(pooler_config=None), (None, None), ("mean", True)),  # MLM & co:
    (types.SimpleNamespace(pooler_config=None), ("cls", False), ("cls", False)),  # MiniLM's way
    (_pooled("cls"), (None, None), ("cls", False)),
    (_pooled("mean", normalize=True), (None, None), ("mean", True)),
    (_pooled("mean", normalize=True), (None, False), ("mean", False)),
    (_pooled("latent", normalize=True), (None, None), None),  # no sentence-transformers module
    (_pooled("mean", projection_dim=128), (None, None), None),
    (_pooled("latent"), ("mean", None), ("mean", False)),
])
def test_export_pooling_follows_the_trained_pooler(objective, explicit, expected):
  assert st_export.pooling_for(objective, *explicit) == expected


def test_tokenize_rows_are_cls_text_sep_then_padding(tokenizer):
  ids, seg, pos = st_export.tokenize(tokenizer, ["x = 1", "import os\n" * 40], 16)
  first = [tokenizer.cls_id, *tokenizer.encode("x = 1"), tokenizer.sep_id]
  assert ids.shape == (2, 16) and list(ids[0, :len(first)]) == first
  assert not ids[0, len(first):].any() and not seg[0, len(first):].any()
  assert list(ids[1]) == [tokenizer.cls_id, *tokenizer.encode("import os\n" * 40)[:14],
                          tokenizer.sep_id]
  assert list(pos[1]) == list(range(16)) and (seg[1] == 1).all()


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("max", True)])
def test_sentence_transformers_loads_export_and_matches_ours(params, tokenizer, tmp_path, pooling,
                                                             normalize):
  out = str(tmp_path / "st")
  st_export.write(out, params, CFG, tokenizer, pooling=pooling, normalize=normalize,
                  max_seq_length=24)
  with open(os.path.join(out, "1_Pooling", "config.json")) as f:
    modes = json.load(f)
  assert [k for k, on in modes.items() if on is True] == [f"pooling_mode_{pooling}_" + (
      "token" if pooling == "cls" else "tokens")]
  assert st_export.read_pooling(out) == pooling
  model = sentence_transformers.SentenceTransformer(out, device="cpu", local_files_only=True)
  assert len(model) == (3 if normalize else 2) and model.max_seq_length == 24
  theirs = model.encode(TEXTS, convert_to_numpy=True, batch_size=2)
  ours = st_export.embed(params, CFG, tokenizer, TEXTS, pooling=pooling, normalize=normalize,
                         max_seq_length=24)
  assert ours.shape == theirs.shape == (len(TEXTS), CFG.hidden_size)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  norms = np.linalg.norm(ours, axis=-1)
  assert np.allclose(norms, 1.0, atol=1e-5) == normalize
  # The long text really was truncated (else 24 vs 64 positions would not matter).
  full = st_export.embed(params, CFG, tokenizer, TEXTS[3:4], pooling=pooling,
                         normalize=normalize)
  assert np.abs(full - ours[3]).max() > 1e-3


def test_bad_max_seq_length_is_explained(params, tokenizer, tmp_path):
  with pytest.raises(ValueError, match=r"max_seq_length 65 must be in \(2, 64\]"):
    st_export.write(str(tmp_path), params, CFG, tokenizer, max_seq_length=65)
  with pytest.raises(ValueError, match="Unknown pooling 'sum'"):
    st_export.write_module_files(str(tmp_path), 32, pooling="sum")
