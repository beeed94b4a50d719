"""Model merging: averages, SLERP and task arithmetic of exports of one architecture.

  python -m pretrain.merge --models=exports/a,exports/b --out=exports/mean
  python -m pretrain.merge --models=exports/a,exports/b --weights=0.7,0.3 --out=exports/w
  python -m pretrain.merge --mode=slerp --models=exports/a,exports/b --t=0.3 --out=exports/s
  python -m pretrain.merge --mode=task_arithmetic --base=exports/base \
      --models=exports/a,exports/b --weights=0.5,0.5 --out=exports/ta

The inputs are what `python -m pretrain.export` writes (or Hugging Face safetensors directories
with the same files). Every tensor file is merged tensor by tensor: the Hugging Face weights
(model.safetensors, read by `hf_read` and written by `hf_bert.write_files` beside its config.json;
an ELECTRA export's generator/ too) and our msgpack trees (flax_params.msgpack, a trained pooler's
pooler_params.msgpack, RetroMAE's decoder.msgpack), so that the Hugging Face, sentence-transformers
and Flax views of the merge agree. Every other file (config.json, encoder_config.json, the
tokenizer's, the sentence-transformers module files, pooler.json) must be the same in every input
and is copied; README.md becomes a model card naming the inputs. The result is an export like
the inputs: `load_encoder`, `SentenceTransformer` and `--config.init_from` read it.

Modes, per tensor, in float64 and cast back to the input's dtype:
- average: sum_i w_i x_i / sum_i w_i (--weights, default uniform; mergekit's normalised linear).
- slerp: spherical interpolation from the first model (t=0) to the second (t=1), as mergekit's
  slerp: the angle between the flattened tensors, its sine factors applied to the unnormalised
  tensors; linear where they are nearly parallel (|cos| > DOT_THRESHOLD) and, unlike mergekit
  (which then shrinks towards zero), where either tensor is ~0 and has no direction.
- task_arithmetic: base + sum_i w_i (x_i - base) (Ilharco et al. 2023; --weights default 1).
  The base may hold more than the models (the MLM export they were trained from: its head, its
  own files) but must hold every model tensor, with its shape, and the models' tokenizer; the
  merge's files are the models'.

Every refusal comes before anything is written, and names the first file or tensor that differs
and the fix: a file one input lacks, a tokenizer file that differs (merging needs one
tokenizer), a tensor that one input lacks or whose shape or dtype differs (merging needs one
architecture), a config file that differs (naming its first differing key). Non-float tensors
must be equal in every input and are copied.
"""
from __future__ import annotations

import json
import os
import shutil

import flax.serialization
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import traverse_util

from objectives.checks import ConfigError
from pretrain import cli, console
from pretrain.interop import files, hf_bert, hf_read

MODES = ("average", "slerp", "task_arithmetic")
DOT_THRESHOLD = 0.9995  # mergekit's: above this |cos| the interpolation is linear
EPS = 1e-8
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "spm.model", "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json")


# --- Tensor arithmetic (numpy, float64) ----------------------------------------------------------

def floating(dtype):
  """Whether a tensor is merged: float32, float16 and bfloat16 (which numpy does not count as a
  floating type) are; integer tensors must be equal and are copied."""
  return bool(jnp.issubdtype(dtype, jnp.floating))


def average(xs, weights):
  """sum_i w_i x_i / sum_i w_i."""
  w = np.asarray(weights, np.float64)
  return sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, xs)) / w.sum()


def slerp(x0, x1, t, dot_threshold=DOT_THRESHOLD, eps=EPS):
  """Spherical interpolation of two tensors (flattened) at t in [0, 1]; see the module docstring."""
  a, b = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
  na, nb = np.linalg.norm(a), np.linalg.norm(b)
  lerp = (1 - t) * a + t * b
  if na < eps or nb < eps:
    return lerp
  dot = float(np.sum(a * b) / (na * nb))
  if abs(dot) > dot_threshold:
    return lerp
  theta = np.arccos(dot)
  return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def task_arithmetic(base, xs, weights):
  """base + sum_i w_i (x_i - base)."""
  b = np.asarray(base, np.float64)
  return b + sum(w * (np.asarray(x, np.float64) - b) for w, x in zip(weights, xs))


def merge_tensor(mode, xs, *, weights=None, t=0.5, base=None):
  """The merge of one tensor's values `xs` (one per model), in the dtype of the first."""
  first = np.asarray(xs[0])
  if not floating(first.dtype):
    return first  # Equal in every input (checked): nothing to merge.
  if mode == "average":
    out = average(xs, weights)
  elif mode == "slerp":
    out = slerp(xs[0], xs[1], t)
  elif mode == "task_arithmetic":
    out = task_arithmetic(base, xs, weights)
  else:
    raise ValueError(f"--mode={mode!r}; choose from {', '.join(MODES)}.")
  return out.astype(first.dtype)


# --- Reading and checking the inputs -------------------------------------------------------------

def is_tensor_file(rel):
  return os.path.basename(rel) == files.WEIGHTS_FILE or rel.endswith(".msgpack")


def list_files(model_dir):
  """Every file under `model_dir` (relative paths, sorted), but the model card."""
  out = []
  for root, _, names in os.walk(model_dir):
    out += [os.path.relpath(os.path.join(root, n), model_dir) for n in names]
  return sorted(f for f in out if f != files.README_FILE)


def read_tensors(model_dir, rel):
  """{name: array} of one tensor file (a msgpack tree flattened with '/')."""
  path = os.path.join(model_dir, rel)
  if os.path.basename(rel) == files.WEIGHTS_FILE:
    return hf_read.load_state_dict(os.path.dirname(path))
  with open(path, "rb") as f:
    try:
      tree = flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on bad bytes.
      raise ValueError(f"{path}: cannot decode ({type(e).__name__}: {e}); export it again.") from None
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _read_other(model_dir, rel):
  path = os.path.join(model_dir, rel)
  if rel.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  with open(path, "rb") as f:
    return f.read()


def _first_difference(a, b):
  """The first top-level key whose values differ in two JSON objects, or None."""
  if not (isinstance(a, dict) and isinstance(b, dict)):
    return None
  return next((k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)), None)


def check_same_files(dirs):
  """The inputs' file list; refuses a file that some input lacks."""
  listed = [list_files(d) for d in dirs]
  if any(files.INDEX_FILE in names for names in listed):
    raise ValueError(f"{files.INDEX_FILE}: sharded weights are not merged; re-save the model "
                     "unsharded (save_pretrained(..., max_shard_size='100GB')).")
  for d, names in zip(dirs[1:], listed[1:]):
    extra = sorted(set(listed[0]) ^ set(names))
    if extra:
      owner, other = (dirs[0], d) if extra[0] in listed[0] else (d, dirs[0])
      raise ValueError(f"{extra[0]}: {owner} has it but {other} does not; merge exports written "
                       "the same way (pretrain.export with the same options).")
  return listed[0]


def check_tokenizers(dirs, names):
  for rel in (n for n in names if os.path.basename(n) in TOKENIZER_FILES):
    first = _read_other(dirs[0], rel)
    for d in dirs[1:]:
      if _read_other(d, rel) != first:
        raise ValueError(f"{rel} differs between {dirs[0]} and {d}: the models use different "
                         "tokenizers, and merged token embeddings need one; merge runs trained "
                         "with one tokenizer (data.tokenizer.path).")


def check_tensors(dirs, rel, trees):
  """Refuses a tensor that one input lacks, or whose shape or dtype differs (or, not float, its
  values), naming it."""
  first = trees[0]
  for d, tree in zip(dirs[1:], trees[1:]):
    extra = sorted(set(first) ^ set(tree))
    if extra:
      owner, other = (dirs[0], d) if extra[0] in first else (d, dirs[0])
      raise ValueError(f"{rel}: tensor {extra[0]} is in {owner} but not in {other}: the models "
                       "differ in architecture; merge only exports of one architecture.")
    for key, x in first.items():
      y = tree[key]
      if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(f"{rel}: tensor {key} is {x.dtype}{list(x.shape)} in {dirs[0]} but "
                         f"{y.dtype}{list(y.shape)} in {d}: the models differ in architecture; "
                         "merge only exports of one architecture (one config).")
      if not floating(x.dtype) and not np.array_equal(x, y):
        raise ValueError(f"{rel}: integer tensor {key} differs between {dirs[0]} and {d}; it "
                         "cannot be averaged.")


def check_others(dirs, names):
  """Refuses a non-tensor file (a config) that differs, naming its first differing key."""
  for rel in (n for n in names if not is_tensor_file(n)):
    first = _read_other(dirs[0], rel)
    for d in dirs[1:]:
      other = _read_other(d, rel)
      if other != first:
        key = _first_difference(first, other)
        what = (f"{key} is {first.get(key)!r} in {dirs[0]} but {other.get(key)!r} in {d}"
                if key is not None else f"it differs between {dirs[0]} and {d}")
        raise ValueError(f"{rel}: {what}; merge only exports of one architecture, exported with "
                         "the same options.")


def check_base(base, model, names, tensors):
  """The base's tensors for task arithmetic ({file: {name: array}}), refusing a model tensor the
  base lacks or holds with another shape or dtype, and a tokenizer file that differs."""
  check_tokenizers([model, base], [n for n in names if os.path.isfile(os.path.join(base, n))])
  out = {}
  for rel, trees in tensors.items():
    if not trees[0]:  # e.g. the empty pooler_params.msgpack of mean pooling
      out[rel] = {}
      continue
    if not os.path.isfile(os.path.join(base, rel)):
      raise ValueError(f"{rel}: {model} has it but the base {base} does not; task vectors need "
                       "the base's value of every tensor (give the export the models started from).")
    out[rel] = read_tensors(base, rel)
    for key, x in trees[0].items():
      y = out[rel].get(key)
      if y is None or y.shape != x.shape or y.dtype != x.dtype:
        found = "not in it" if y is None else f"{y.dtype}{list(y.shape)} there"
        raise ValueError(f"{rel}: tensor {key} is {x.dtype}{list(x.shape)} in {model} but {found} "
                         f"(the base {base}): the models differ in architecture from the base; "
                         "give the base they were trained from.")
  return out


def check_slerp_views(model_dir, names):
  """SLERP's angle is taken per tensor, so it must see the same tensors in both copies of the
  weights. ModernBERT's Hugging Face file fuses query, key and value into one tensor (Wqkv),
  which the Flax file keeps as three: the two copies would end up with different weights."""
  config_path = os.path.join(model_dir, files.CONFIG_FILE)
  if files.CONFIG_FILE in names and files.MSGPACK_FILE in names:
    with open(config_path, encoding="utf-8") as f:
      model_type = json.load(f).get("model_type")
    if model_type == "modernbert":
      raise ValueError("--mode=slerp: a ModernBERT export holds query/key/value fused in "
                       f"{files.WEIGHTS_FILE} and separate in {files.MSGPACK_FILE}, so per-tensor "
                       "angles differ between them; use --mode=average or task_arithmetic.")


# --- The command ---------------------------------------------------------------------------------

def model_card(mode, models, weights, t, base, first_card):
  lines = ["# Merged encoder", "",
           f"- merge: `{mode}` (`python -m pretrain.merge`), every tensor of the inputs' files"]
  if mode == "slerp":
    lines.append(f"- t = {t}: from `{models[0]}` (t=0) to `{models[1]}` (t=1)")
  else:
    lines += [f"- base: `{base}`"] if base else []
    lines += [f"- `{m}`, weight {w:g}" for m, w in zip(models, weights)]
  lines += ["", "Architecture, tokenizer and sentence-transformers files are the inputs' (equal in "
            "all of them). The first input's card:", ""]
  return "\n".join(lines) + "\n" + first_card


def merge(models, out, mode="average", *, weights=None, t=0.5, base=None, overwrite=False):
  """Checks every input, then writes the merge of `models` into `out`; returns `out`."""
  if os.path.isfile(out):
    raise FileExistsError(f"--out={out} is a file; give a directory to write the merge into.")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f"Merge directory {out} is not empty; choose another --out or pass "
                          "--overwrite.")
  if weights is None:
    weights = [1.0] * len(models)
  dirs = list(models)
  names = check_same_files(dirs)
  check_tokenizers(dirs, names)
  tensors = {}  # The Hugging Face weights first: a refusal names their tensors.
  for rel in sorted(filter(is_tensor_file, names),
                    key=lambda n: (os.path.basename(n) != files.WEIGHTS_FILE, n)):
    tensors[rel] = [read_tensors(d, rel) for d in dirs]
    check_tensors(dirs, rel, tensors[rel])
  check_others(dirs, names)
  if mode == "slerp":
    check_slerp_views(dirs[0], names)
  base_tensors = check_base(base, dirs[0], names, tensors) if base else {}

  for root, _, _ in os.walk(dirs[0]):  # Empty ones too: sentence-transformers' 2_Normalize.
    os.makedirs(os.path.join(out, os.path.relpath(root, dirs[0])), exist_ok=True)
  written = set()
  for rel, trees in tensors.items():
    merged = {key: merge_tensor(mode, [tree[key] for tree in trees], weights=weights, t=t,
                                base=base_tensors[rel][key] if base else None)
              for key in trees[0]}
    target = os.path.join(out, rel)
    if os.path.basename(rel) == files.WEIGHTS_FILE:
      config_rel = os.path.join(os.path.dirname(rel), files.CONFIG_FILE)
      hf_bert.write_files(os.path.dirname(target), merged, _read_other(dirs[0], config_rel))
      written.add(os.path.normpath(config_rel))
    else:
      tree = traverse_util.unflatten_dict(merged, sep="/")
      with open(target + ".tmp", "wb") as f:
        f.write(flax.serialization.msgpack_serialize(tree))
      os.replace(target + ".tmp", target)
  for rel in names:
    if not is_tensor_file(rel) and os.path.normpath(rel) not in written:
      shutil.copyfile(os.path.join(dirs[0], rel), os.path.join(out, rel))
  card = os.path.join(models[0], files.README_FILE)
  first_card = _read_other(models[0], files.README_FILE).decode() if os.path.isfile(card) else ""
  with open(os.path.join(out, files.README_FILE), "w", encoding="utf-8") as f:
    f.write(model_card(mode, models, weights, t, base, first_card))
  return out


def check_flags(f):
  """One line per bad flag, before anything is read."""
  models, weights = list(f.models or []), f.weights
  need = {"average": "two or more", "slerp": "exactly two", "task_arithmetic": "one or more"}[f.mode]
  if (len(models) < 2 if f.mode == "average" else len(models) != 2 if f.mode == "slerp"
      else not models):
    raise ConfigError(f"--models={','.join(models)}: --mode={f.mode} merges {need} export "
                      "directories (comma-separated).")
  if bool(f.base) != (f.mode == "task_arithmetic"):
    raise ConfigError(f"--base={f.base!r}: give --base=<export> with --mode=task_arithmetic "
                      "(the shared base the task vectors are taken against), and only then.")
  if weights is not None:
    try:
      weights = [float(w) for w in weights]
    except ValueError:
      raise ConfigError(f"--weights={','.join(f.weights)}: not numbers.") from None
    if f.mode == "slerp" or len(weights) != len(models):
      raise ConfigError(f"--weights={','.join(f.weights)}: one weight per --models entry "
                        f"({len(models)}), and none with --mode=slerp (use --t).")
    if f.mode == "average" and (min(weights) < 0 or sum(weights) <= 0):
      raise ConfigError(f"--weights={','.join(f.weights)}: averaging needs weights >= 0 with a "
                        "positive sum.")
  if not 0 <= f.t <= 1:
    raise ConfigError(f"--t={f.t}: the SLERP position must be in [0, 1] (0: the first model).")
  for path in models + ([f.base] if f.base else []):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path}: no such directory; give pretrain.export directories.")
  if os.path.abspath(f.out) in {os.path.abspath(p) for p in models + [f.base or ""]}:
    raise ConfigError(f"--out={f.out} is one of the inputs; write the merge elsewhere.")
  return models, weights


def define_flags():
  flags.DEFINE_list("models", None, "Export directories to merge (comma-separated).")
  flags.DEFINE_enum("mode", "average", MODES, "average, slerp (two models) or task_arithmetic "
                    "(needs --base).")
  flags.DEFINE_list("weights", None, "One weight per model (average: normalised to sum 1; "
                    "task_arithmetic: the task vectors' scales). Default: equal / 1.")
  flags.DEFINE_float("t", 0.5, "slerp: 0 is the first model, 1 the second.")
  flags.DEFINE_string("base", None, "task_arithmetic: the export the models were trained from.")
  flags.DEFINE_string("out", None, "Directory to write; must be empty or not exist.")
  flags.DEFINE_bool("overwrite", False, "Allow writing into a non-empty --out.")
  flags.mark_flags_as_required(["models", "out"])


def main(argv):
  del argv
  f = flags.FLAGS
  console.quiet(f["verbosity"].present)
  models, weights = check_flags(f)
  out = merge(models, f.out, f.mode, weights=weights, t=f.t, base=f.base, overwrite=f.overwrite)
  print(f"Merged {len(models)} models ({f.mode}) into {out}.")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
