"""A compact student's starting parameters cut out of a larger teacher (DistilBERT's init).

  --config.init_from=<teacher> --config.init_from_layers=every_k   # or first, or "0,2,4,7,9,11"

The teacher is anything `load.load_encoder` reads (a workdir, an export, a Hugging Face BERT /
ELECTRA / RoBERTa / ModernBERT directory). Depth: student layer i takes teacher layer
`teacher_layers(...)[i]`: `every_k` (k = teacher / student layers; layers k-1, 2k-1, ..., the
last: the uniform map distill's hidden-state transfer uses too), `first` (the bottom ones), or an
explicit 0-based list (DistilBERT took 0, 2, 4, 7, 9, 11 of BERT-base). Width: every array is cut
to its leading units on each axis (the first hidden units, heads, head dimensions, MLP units,
positions), as the student's shapes ask; the embeddings, the norms and the MLM head (when both
have one) come along the same way. A student is only ever a part of its teacher: an axis wider
than the teacher's, another vocabulary or another architecture (position type, MLP, norm
placement) is one error line naming config.init_from before anything runs.
"""
import jax
import numpy as np

from pretrain.models.encoder import EncoderConfig

LAYER_CHOICES = ("every_k", "first")
# EncoderConfig fields a cut cannot change: they decide which parameters exist and what they mean.
SAME = ("vocab_size", "position", "mlp", "pre_norm", "norm", "norm_bias", "use_bias", "mlm_head",
        "projects_embeddings")
# Widths the student may shrink: (EncoderConfig attribute, config key that sets it).
NARROWER = (("hidden_size", "model.hidden_size"), ("num_heads", "model.num_heads"),
            ("head_dim", "model.hidden_size / model.num_heads"), ("mlp_dim", "model.mlp_dim"),
            ("embed_dim", "model.embedding_size"), ("type_vocab_size", "model.type_vocab_size"),
            ("num_layers", "model.num_layers"))


def teacher_layers(spec: str, student_layers: int, teacher_layers_: int, where: str) -> list:
  """The 0-based teacher layer each student layer starts from."""
  n, m = student_layers, teacher_layers_
  if spec == "first":
    return list(range(n))
  if spec == "every_k":
    return [(2 * (i + 1) * m + n) // (2 * n) - 1 for i in range(n)]  # (i + 1) m / n, rounded
  layers = [int(p) for p in spec.split(",")]
  if len(layers) != n or max(layers) >= m:
    raise ValueError(f"config.init_from_layers={spec!r}: needs model.num_layers={n} teacher "
                     f"layers, each < {m} (the layers of {where}).")
  return layers


def check_cuttable(student: EncoderConfig, teacher: EncoderConfig, where: str) -> None:
  """One line naming config.init_from when `student` is not a part of `teacher`."""
  for field in SAME:
    mine, theirs = getattr(student, field), getattr(teacher, field)
    if mine != theirs:
      raise ValueError(f"config.init_from={where!r} has {field}={theirs!r} but this model has "
                       f"{mine!r}; a student cut from a teacher keeps its architecture and "
                       f"vocabulary: set the model's {field} to {theirs!r}.")
  learned = [("max_len", "model.max_len")] if student.position == "learned" else []
  for field, key in NARROWER + tuple(learned):
    mine, theirs = getattr(student, field), getattr(teacher, field)
    if mine > theirs or (field == "type_vocab_size" and (mine == 0) != (theirs == 0)):
      raise ValueError(f"config.init_from={where!r}: this model's {key} gives {field}={mine}, "
                       f"more than the teacher's {theirs}; a student can only be cut to at most "
                       f"the teacher's size: make it <= {theirs}.")


def select_layers(encoder: dict, layers: list) -> dict:
  """The encoder tree with student layer i = teacher layer layers[i] (other entries kept)."""
  out = {k: v for k, v in encoder.items() if not k.startswith("layer_")}
  out.update({f"layer_{i}": encoder[f"layer_{j}"] for i, j in enumerate(layers)})
  return out


def cut(tree, like, where: str):
  """Each array of `like`'s paths taken from `tree`, cut to its leading units on each axis."""
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

  def take(path, target):
    key = jax.tree_util.keystr(path)
    value = flat.get(key)
    shape = None if value is None else np.shape(value)
    if shape is None or len(shape) != len(target.shape) or any(
        s < t for s, t in zip(shape, target.shape)):
      raise ValueError(f"config.init_from={where!r}: parameter {key} is {shape} there, which "
                       f"cannot be cut to this model's {tuple(target.shape)}.")
    return np.asarray(value)[tuple(slice(0, t) for t in target.shape)].astype(target.dtype)

  return jax.tree_util.tree_map_with_path(take, like)


def student_params(pretrained, spec: str, student: EncoderConfig, shapes: dict, where: str):
  """{"encoder"[, "mlm_head"]}: numpy trees shaped like `shapes` (the run's unboxed params'
  ShapeDtypeStructs), from `pretrained` (a `load.Pretrained`)."""
  check_cuttable(student, pretrained.config, where)
  layers = teacher_layers(spec, student.num_layers, pretrained.config.num_layers, where)
  out = {"encoder": cut(select_layers(pretrained.encoder, layers), shapes["encoder"], where)}
  if "mlm_head" in shapes and "mlm_head" in pretrained.heads:
    out["mlm_head"] = cut(pretrained.heads["mlm_head"], shapes["mlm_head"], where)
  return out
