"""Distillation from a frozen teacher during pretraining (DistilBERT, TinyBERT).

  --config.objective.name=distill --config.objective.teacher=<workdir | export | HF dir>
  --config.objective.name=combined --config.objective.components="mlm:1.0,distill:1.0"

The teacher is any model `pretrain.interop.load.load_teacher` reads (a pretraining workdir, our
export, a Hugging Face BERT / ELECTRA / RoBERTa / ModernBERT directory) with its MLM head when it
has one. Its arrays live in the objective's non-gradient state, boxed with the logical axes of
its own modules so that FSDP shards them like the student's; the jitted step runs it forward
under stop_gradient with dropout off, on the same corrupted rows the student reads. It is
checkpointed with the state, and a resume that names another teacher is refused
(`shape_fields`). The teacher's directory must still be readable to resume or export the run:
the objective is rebuilt from it (its shapes and tokenizer are checked again).

Losses, summed with their weights (at least one > 0):
- logits (`logit_weight`): Hinton's soft targets at the masked slots, T^2 KL(p_t || p_s) with
  p = softmax(logits / T), T = `distill_temperature`, over the shared vocabulary: STUDENT AND
  TEACHER MUST SHARE A TOKENIZER (checked: sizes, and the pieces in id order when both tokenizers
  are readable). Needs the teacher's MLM head (a bare encoder such as all-MiniLM-L6-v2 has none).
- hard MLM (`mlm_weight`): the usual cross-entropy at the same slots (DistilBERT mixes both;
  `combined` with `mlm` does the same on other masks).
- hidden states (`hidden_weight`): student layer s matched to teacher layer t for each pair of
  `hidden_layer_map` ("" = uniform: student layer i of n to teacher layer i * m / n of m, rounded,
  for i = 1..n; layer 0 is the embedding output), over every non-padding token. The student's
  states go through ONE learned linear projection to the teacher's width when the widths differ
  (TinyBERT's W_h; trained, in params["hidden_projection"], and not part of the exported
  encoder). `hidden_loss`: "cosine" (DistilBERT's 1 - cos, scale-free, the default) or "mse"
  (TinyBERT's mean squared error per dimension).
- attention maps (MiniLM / TinyBERT) are NOT transferred: the encoder's attention runs through
  jax.nn.dot_product_attention, which never materialises the probabilities; recomputing them
  here would duplicate attention.py's masks, rotary positions and local windows for every
  architecture option and hold a [B, heads, L, L] array per layer, the memory fused kernels avoid.

Metrics: kl (at T, before the T^2 scale), hidden_loss, agreement (student top-1 = teacher top-1
at the masked slots), teacher_accuracy, the student's mlm_loss / mlm_accuracy, total_loss.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from objectives import base, checks, masking
from objectives.mlm import mlm_loss_and_metrics
from pretrain.models import encoder as enc, layers

CONFIG = dict(
    teacher="",                # distill: the frozen teacher (workdir, export or HF directory)
    distill_temperature=2.0,   # distill: softmax temperature of the soft targets
    logit_weight=1.0,          # distill: weight of T^2 KL(teacher || student) at masked slots
    mlm_weight=0.0,            # distill: weight of the hard MLM cross-entropy at the same slots
    hidden_weight=0.0,         # distill: weight of the hidden-state loss
    hidden_loss="cosine",      # distill: cosine (DistilBERT) or mse (TinyBERT)
    hidden_layer_map="",       # distill: "s:t,..." student:teacher layers (0 = embeddings);
                               # "": uniform, student layer i of n <- teacher layer i*m/n of m
)
HIDDEN_LOSSES = ("cosine", "mse")


def validate_config(config):
  """The distill keys' values, before anything loads or compiles."""
  o = config.objective
  checks.require(bool(o.teacher), "objective.teacher", o.teacher,
                 "a pretraining workdir, export or Hugging Face directory to distill from")
  checks.require(o.distill_temperature > 0, "objective.distill_temperature",
                 o.distill_temperature, "> 0")
  weights = (o.logit_weight, o.mlm_weight, o.hidden_weight)
  checks.require(min(weights) >= 0 and sum(weights) > 0, "objective.logit_weight",
                 weights, "logit_weight, mlm_weight, hidden_weight >= 0, not all 0")
  checks.require(o.hidden_loss in HIDDEN_LOSSES, "objective.hidden_loss", o.hidden_loss,
                 ", ".join(HIDDEN_LOSSES))
  try:
    pairs = parse_layer_map(o.hidden_layer_map)
  except ValueError:
    pairs = None
  checks.require(pairs is not None and len({s for s, _ in pairs}) == len(pairs),
                 "objective.hidden_layer_map", o.hidden_layer_map,
                 "'' (uniform) or distinct student:teacher pairs of layer numbers like '1:2,2:4'")


def parse_layer_map(spec):
  """"1:2,2:4" -> [(1, 2), (2, 4)]; "" -> [] (uniform)."""
  pairs = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    s, sep, t = item.partition(":")
    if not sep or int(s) < 0 or int(t) < 0:
      raise ValueError(item)
    pairs.append((int(s), int(t)))
  return pairs


def uniform_layer_map(student_layers, teacher_layers):
  """Student layer i (1..n) <- teacher layer i m / n rounded half up: every k-th when m = k n."""
  n, m = student_layers, teacher_layers
  return [(i, (2 * i * m + n) // (2 * n)) for i in range(1, n + 1)]


def soft_kl(student_BMV, teacher_BMV, temperature):
  """KL(softmax(teacher / T) || softmax(student / T)) per slot [B, M], in float32."""
  log_s = jax.nn.log_softmax(student_BMV.astype(jnp.float32) / temperature, -1)
  log_t = jax.nn.log_softmax(teacher_BMV.astype(jnp.float32) / temperature, -1)
  return jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1)


def hidden_distance(student_BLH, teacher_BLH, kind):
  """Per-token [B, L] distance: 1 - cosine, or the mean squared error over the width."""
  s, t = student_BLH.astype(jnp.float32), teacher_BLH.astype(jnp.float32)
  if kind == "mse":
    return jnp.mean(jnp.square(s - t), -1)
  norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
  return 1.0 - jnp.sum(s * t, -1) / jnp.maximum(norms, 1e-9)


def check_same_tokenizer(teacher: base.Teacher, vocab_size, tokenizer):
  """One line naming objective.teacher and both vocabularies when they differ."""
  mine = getattr(tokenizer, "model_path", "") or "data.tokenizer"
  theirs = teacher.tokenizer_file or "no tokenizer file"
  fix = ("distillation compares the two models over one vocabulary: set data.tokenizer.path to "
         "the teacher's tokenizer.")
  if teacher.model_config.vocab_size != vocab_size:
    raise ValueError(f"objective.teacher={teacher.path!r} has a "
                     f"{teacher.model_config.vocab_size}-token vocabulary ({theirs}) but the "
                     f"student has {vocab_size} ({mine}); {fix}")
  if teacher.pieces is None or not hasattr(tokenizer, "id_to_piece"):
    return
  for i, piece in enumerate(teacher.pieces):
    if tokenizer.id_to_piece(i) != piece:
      raise ValueError(f"objective.teacher={teacher.path!r}: its tokenizer ({theirs}) and the "
                       f"student's ({mine}) differ at id {i} ({piece!r} vs "
                       f"{tokenizer.id_to_piece(i)!r}); {fix}")


class Distill(base.EncoderObjective):
  """See the module docstring. Params {"encoder", "mlm_head"[, "hidden_projection"]}."""

  checks = (masking.validate_config, validate_config)
  shape_fields = ("objective.teacher",)

  @classmethod
  def needs(cls, objective_config):
    del objective_config
    return frozenset({"teacher"})

  def __init__(self, config, model_config: enc.EncoderConfig, tokenizer, resources=base.Resources()):
    super().__init__(config, model_config, tokenizer, resources)
    self.head_module = enc.MlmHead(model_config)
    self.teacher = t = resources.teacher
    if t is None:
      raise ValueError(f"objective.teacher={config.teacher!r}: the entry point builds the teacher "
                       "(pretrain.interop.load.load_teacher) and passes it in Resources.")
    check_same_tokenizer(t, model_config.vocab_size, tokenizer)
    if config.logit_weight > 0 and "mlm_head" not in t.params:
      raise ValueError(f"objective.teacher={t.path!r} has no MLM head (a bare encoder), so it "
                       "has no logits to distill: set objective.logit_weight=0 and use "
                       "objective.hidden_weight, or give a teacher with an MLM head.")
    n, m = model_config.num_layers, t.model_config.num_layers
    self.layer_map = (parse_layer_map(config.hidden_layer_map) or uniform_layer_map(n, m)
                      if config.hidden_weight > 0 else [])
    bad = [(s, u) for s, u in self.layer_map if s > n or u > m]
    if bad:
      raise ValueError(f"objective.hidden_layer_map={config.hidden_layer_map!r}: {bad[0]} is out "
                       f"of range; student layers are 0..{n}, teacher layers 0..{m}.")
    self.teacher_encoder = enc.Encoder(t.model_config)
    self.teacher_head = enc.MlmHead(t.model_config) if "mlm_head" in t.params else None
    width = t.model_config.hidden_size
    self.projection = (nn.Dense(width, dtype=jnp.dtype(model_config.dtype),
                                kernel_init=layers.init(model_config, ("embed", None)),
                                bias_init=layers.zeros((None,)))
                       if self.layer_map and width != model_config.hidden_size else None)

  # --- Parameters and state ---
  def init(self, rng, batch):
    enc_rng, head_rng, proj_rng = jax.random.split(rng, 3)
    hidden = jnp.zeros((batch["input_ids"].shape[0], 1, self.model_config.hidden_size))
    table = jnp.zeros((self.model_config.vocab_size, self.model_config.embed_dim))
    params = {"encoder": self.init_encoder(enc_rng, batch),
              "mlm_head": self.head_module.init(head_rng, hidden, table)["params"]}
    if self.projection is not None:
      params["hidden_projection"] = self.projection.init(proj_rng, hidden)["params"]
    return params

  def init_state(self):
    return {"teacher": self._boxed_teacher()}

  def _boxed_teacher(self):
    """The teacher's arrays with the logical axis boxes of its modules (so FSDP shards them)."""
    t, key, ones = self.teacher.model_config, jax.random.key(0), jnp.ones((1, 2), jnp.int32)
    boxed = {"encoder": jax.eval_shape(self.teacher_encoder.init, key, ones, ones, ones)["params"]}
    if self.teacher_head is not None:
      boxed["mlm_head"] = jax.eval_shape(
          self.teacher_head.init, key, jnp.zeros((1, 1, t.hidden_size)),
          jnp.zeros((t.vocab_size, t.embed_dim)))["params"]
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda b, v: b.replace_boxed(jnp.asarray(v)) if is_box(b)
                        else jnp.asarray(v), boxed, self.teacher.params, is_leaf=is_box)

  # --- Forward passes ---
  def _layers(self, module, encoder_params, input_ids, batch, rng, train):
    """Every layer's states (embeddings first) when hidden states are matched, else the last."""
    out = module.apply({"params": encoder_params}, input_ids, batch["segment_ids"],
                       batch["positions"], deterministic=not train,
                       rngs={"dropout": rng} if train else {},
                       return_all_layers=bool(self.layer_map))
    return out if self.layer_map else (out,)

  def _logits(self, head, head_params, encoder_params, last_BLH, positions_BM):
    return head.apply({"params": head_params}, enc.gather_positions(last_BLH, positions_BM),
                      enc.word_embedding_table(encoder_params))

  def hidden_loss(self, params, student, teacher, token_weights_BL):
    """Mean over the mapped layer pairs of the per-token distance, averaged over real tokens."""
    total = jnp.zeros((), jnp.float32)
    for s, t in self.layer_map:
      states = student[s]
      if self.projection is not None:
        states = self.projection.apply({"params": params["hidden_projection"]}, states)
      distance = hidden_distance(states, teacher[t], self.config.hidden_loss)
      total = total + jnp.sum(distance * token_weights_BL) / jnp.maximum(token_weights_BL.sum(), 1)
    return total / len(self.layer_map)

  # --- Loss ---
  def loss(self, params, state, batch, rng, *, train):
    c = self.config
    mask_rng, dropout_rng = jax.random.split(rng)
    masked = self.mask(mask_rng, batch["input_ids"])
    student = self._layers(self.encoder_module, params["encoder"], masked.input_ids, batch,
                           dropout_rng, train)
    logits = self._logits(self.head_module, params["mlm_head"], params["encoder"], student[-1],
                          masked.positions)
    mlm, metrics = mlm_loss_and_metrics(logits, masked.targets, masked.weights)
    frozen = jax.lax.stop_gradient(state["teacher"])
    teacher = self._layers(self.teacher_encoder, frozen["encoder"], masked.input_ids, batch,
                           None, False)
    total = c.mlm_weight * mlm
    weights = masked.weights.astype(jnp.float32)
    if self.teacher_head is not None:
      t_logits = self._logits(self.teacher_head, frozen["mlm_head"], frozen["encoder"],
                              teacher[-1], masked.positions)
      kl = soft_kl(logits, t_logits, c.distill_temperature)
      mean_kl = jnp.sum(kl * weights) / jnp.maximum(weights.sum(), 1.0)
      total = total + c.logit_weight * c.distill_temperature ** 2 * mean_kl
      t_top = jnp.argmax(t_logits, -1)
      metrics.update(kl=base.mean_metric(kl, weights),
                     agreement=base.mean_metric(jnp.argmax(logits, -1) == t_top, weights),
                     teacher_accuracy=base.mean_metric(t_top == masked.targets, weights))
    if self.layer_map:
      hidden = self.hidden_loss(params, student, teacher,
                                (batch["segment_ids"] > 0).astype(jnp.float32))
      total = total + c.hidden_weight * hidden
      metrics["hidden_loss"] = base.mean_metric(hidden, jnp.ones(()))
    metrics["total_loss"] = base.mean_metric(total, jnp.ones(()))
    return total, (metrics, state)
