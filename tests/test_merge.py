"""Model merging (pretrain/merge.py): closed forms per tensor, on tiny exports, and its refusals."""
import os
import subprocess
import sys
import sysconfig
import types

import jax
import ml_dtypes
import numpy as np
import pytest

from configs import common, contriever
from objectives import registry
from objectives.checks import ConfigError
from pretrain import export, merge
from pretrain.data import tokenizer as tok_lib
from pretrain.interop import files, hf_read, load, sentence_transformers as st_export
from tests.conftest import ROOT
from tests.test_contrastive import _random_params

VOCAB = 500


def _tokenizer(tmp_path_factory, names):
  stdlib = sysconfig.get_paths()["stdlib"]
  texts = [open(os.path.join(stdlib, n), encoding="utf-8").read() for n in names]
  return tok_lib.train(texts, str(tmp_path_factory.mktemp("spm") / "spm.model"), VOCAB)


def _export(out, tokenizer, seed, mlp_dim=64, mlm=False):
  """A contrastive export (mean pooling, normalised), or an MLM one, of a 1-layer, width-32
  encoder with random params: what pretrain.export writes, without a training run."""
  config = contriever.get_config(f"size=tiny,vocab_size={VOCAB},seq_len=32,normalize=True")
  if mlm:
    config.objective.name = "mlm"
  config.model.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=mlp_dim, max_len=32)
  objective = registry.build(common.validate(config), tokenizer)
  params = _random_params(objective, seed=seed)
  export.write_export(str(out), config, tokenizer, objective, params, 5, [])
  return str(out)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  tokenizer = _tokenizer(tmp_path_factory, ("textwrap.py", "glob.py"))
  root = tmp_path_factory.mktemp("exports")
  return types.SimpleNamespace(
      a=_export(root / "a", tokenizer, 1), b=_export(root / "b", tokenizer, 2),
      wide=_export(root / "wide", tokenizer, 3, mlp_dim=128),
      mlm=_export(root / "mlm", tokenizer, 5, mlm=True),
      other_tokenizer=_export(root / "tok", _tokenizer(tmp_path_factory, ("shlex.py", "heapq.py")),
                              4),
      tokenizer=tokenizer)


def _tensors(path):
  """{file/tensor: array} of every tensor file of a directory."""
  return {f"{rel}:{k}": v for rel in merge.list_files(path) if merge.is_tensor_file(rel)
          for k, v in merge.read_tensors(path, rel).items()}


def test_slerp_closed_forms():
  rng = np.random.default_rng(0)
  x0, x1 = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
  np.testing.assert_allclose(merge.slerp(x0, x1, 0.0), x0, rtol=1e-12)
  np.testing.assert_allclose(merge.slerp(x0, x1, 1.0), x1, rtol=1e-12)
  e0, e1 = np.array([2.0, 0.0]), np.array([0.0, 2.0])  # Orthogonal, norm 2.
  mid = merge.slerp(e0, e1, 0.5)
  np.testing.assert_allclose(np.linalg.norm(mid), 2.0)  # Linear would give sqrt(2).
  np.testing.assert_allclose(np.degrees(np.arccos(mid @ e0 / 4)), 45.0)
  third = merge.slerp(e0, e1, 1 / 3)  # A third of the way: 30 degrees from the first.
  np.testing.assert_allclose(np.degrees(np.arccos(third @ e0 / 4)), 30.0)
  # Nearly parallel, and zero, tensors interpolate linearly.
  np.testing.assert_allclose(merge.slerp(e0, 1.0001 * e0, 0.5), 1.00005 * e0)
  np.testing.assert_allclose(merge.slerp(np.zeros(2), e1, 0.25), 0.25 * e1)
  np.testing.assert_allclose(merge.task_arithmetic(x0, [x1, x0 + 1], [0.5, 2.0]),
                             x0 + 0.5 * (x1 - x0) + 2.0)


def test_bfloat16_tensors_are_merged_and_modernbert_slerp_is_refused(tmp_path):
  halves = merge.merge_tensor("average", [np.ones(3, ml_dtypes.bfloat16),
                                          np.zeros(3, ml_dtypes.bfloat16)], weights=[1, 1])
  assert halves.dtype == ml_dtypes.bfloat16 and np.all(halves.astype(np.float32) == 0.5)
  (tmp_path / files.CONFIG_FILE).write_text('{"model_type": "modernbert"}')
  with pytest.raises(ValueError, match="--mode=slerp: a ModernBERT export holds query/key/value"):
    merge.check_slerp_views(str(tmp_path), {files.CONFIG_FILE, files.MSGPACK_FILE})
  merge.check_slerp_views(str(tmp_path), {files.CONFIG_FILE})  # HF weights alone: one view


def test_average_and_weighted_average_are_the_tensorwise_means(exports, tmp_path):
  a, b = _tensors(exports.a), _tensors(exports.b)
  assert len(a) > 20 and any(k.startswith("flax_params.msgpack:") for k in a)
  out = merge.merge([exports.a, exports.b], str(tmp_path / "mean"))
  mean = _tensors(out)
  assert mean.keys() == a.keys()
  for key in a:
    np.testing.assert_allclose(mean[key], (a[key] + b[key]) / 2, rtol=1e-6, atol=1e-7,
                               err_msg=key)
    assert mean[key].dtype == a[key].dtype
  weighted = _tensors(merge.merge([exports.a, exports.b], str(tmp_path / "w"), weights=[3, 1]))
  key = "model.safetensors:bert.embeddings.word_embeddings.weight"
  np.testing.assert_allclose(weighted[key], 0.75 * a[key] + 0.25 * b[key], rtol=1e-6, atol=1e-7)
  # The Hugging Face and the Flax views of the merge are the same encoder.
  flax_config, flax_params = load.read_export(out)
  imported = hf_read.read_hf_encoder(out)
  assert imported.config == flax_config
  jax.tree.map(np.testing.assert_array_equal, imported.encoder, flax_params["encoder"])
  card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
  assert "`average`" in card and exports.a in card and "# Pretrained encoder" in card


def test_slerp_endpoints_and_task_arithmetic_of_one_model(exports, tmp_path):
  a, b = _tensors(exports.a), _tensors(exports.b)
  start = _tensors(merge.merge([exports.a, exports.b], str(tmp_path / "s0"), "slerp", t=0.0))
  end = _tensors(merge.merge([exports.a, exports.b], str(tmp_path / "s1"), "slerp", t=1.0))
  task = _tensors(merge.merge([exports.b], str(tmp_path / "ta"), "task_arithmetic",
                              weights=[1.0], base=exports.a))
  # The MLM export a contrastive run starts from holds more (its head): a base all the same.
  from_mlm = _tensors(merge.merge([exports.b], str(tmp_path / "tm"), "task_arithmetic",
                                  weights=[1.0], base=exports.mlm))
  two = _tensors(merge.merge([exports.a, exports.b], str(tmp_path / "t2"), "task_arithmetic",
                             weights=[0.5, 2.0], base=exports.mlm))
  mlm = _tensors(exports.mlm)
  assert any(k.startswith("model.safetensors:cls.") for k in mlm) and from_mlm.keys() == a.keys()
  for key in a:
    np.testing.assert_allclose(start[key], a[key], rtol=1e-6, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(end[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(task[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(from_mlm[key], b[key], rtol=1e-6, atol=1e-6, err_msg=key)
  key = "model.safetensors:bert.encoder.layer.0.output.dense.weight"
  np.testing.assert_allclose(two[key], mlm[key] + 0.5 * (a[key] - mlm[key])
                             + 2.0 * (b[key] - mlm[key]), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"tensor bert\.encoder\.layer\.0\.intermediate\.dense\."
                                       r"\w+ is float32\[.*\(the base .*wide\)"):
    merge.merge([exports.b], str(tmp_path / "never"), "task_arithmetic", base=exports.wide)


def test_the_merge_loads_and_encodes(exports, tmp_path):
  out = merge.merge([exports.a, exports.b], str(tmp_path / "m"), "slerp", t=0.5)
  model = load.load_encoder(out)
  assert model.source == "export"
  texts = ["def add(a, b):\n    return a + b\n", "import os"]
  merged, first = (st_export.embed(m.encoder, m.config, m.tokenizer(), texts, max_seq_length=32)
                   for m in (model, load.load_encoder(exports.a)))
  assert merged.shape == (2, 32) and np.isfinite(merged).all()
  np.testing.assert_allclose(np.linalg.norm(merged, axis=-1), 1.0, rtol=1e-5)
  assert np.abs(merged - first).max() > 1e-3  # Not simply the first model.
  for name in ("modules.json", "1_Pooling/config.json", "2_Normalize"):  # sentence-transformers'
    assert os.path.exists(os.path.join(out, name)), name


def test_mismatched_shapes_and_tokenizers_are_refused_before_writing(exports, tmp_path):
  out = str(tmp_path / "never")
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor bert\.encoder\.layer\.0\."
                                       r"(intermediate|output)\.dense\.\w+ is float32\[.*differ "
                                       "in architecture"):
    merge.merge([exports.a, exports.wide], out)
  with pytest.raises(ValueError, match=r"^(spm\.model|tokenizer\.json) differs between .*"
                                       "different tokenizers"):
    merge.merge([exports.a, exports.other_tokenizer], out, "slerp")
  assert not os.path.exists(out)
  os.makedirs(out)
  open(os.path.join(out, "x"), "w").close()
  with pytest.raises(FileExistsError, match="not empty; choose another --out or pass --overwrite"):
    merge.merge([exports.a, exports.b], out)


def test_bad_flags_are_one_line_each():
  def flags(**kw):
    return types.SimpleNamespace(**{**dict(models=["x", "y"], mode="average", weights=None, t=0.5,
                                           base=None, out="o"), **kw})
  cases = [(dict(mode="slerp", models=["x", "y", "z"]), "merges exactly two"),
           (dict(mode="task_arithmetic"), "--base=None: give --base"),
           (dict(weights=["1"]), "one weight per --models entry"),
           (dict(weights=["-1", "1"]), "weights >= 0"),
           (dict(t=1.5), "--t=1.5")]
  for kw, message in cases:
    with pytest.raises(ConfigError, match=message):
      merge.check_flags(flags(**kw))


def test_the_command_merges_and_refuses_in_one_line(exports, tmp_path):
  """`python -m pretrain.merge` end to end: a merge that loads, and a refusal that writes nothing."""
  def run(*args):
    return subprocess.run([sys.executable, "-m", "pretrain.merge", *args], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  out = tmp_path / "mean"
  done = run(f"--models={exports.a},{exports.b}", f"--out={out}", "--weights=3,1")
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"Merged 2 models (average) into {out}." in done.stdout
  merged = _tensors(str(out))
  first, second = _tensors(exports.a), _tensors(exports.b)
  key = next(k for k in merged if np.issubdtype(merged[k].dtype, np.floating))
  np.testing.assert_allclose(merged[key], 0.75 * first[key] + 0.25 * second[key], rtol=1e-5,
                             atol=1e-7)
  refused = run(f"--models={exports.a},{exports.other_tokenizer}", f"--out={tmp_path / 'no'}")
  lines = refused.stderr.strip().splitlines()
  assert refused.returncode != 0 and lines[-1].startswith("error: ") and "tokenizer" in lines[-1]
  assert "Traceback" not in refused.stderr and not (tmp_path / "no").exists()
