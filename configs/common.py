"""Shared config pieces: the `key=value` argument parser, model sizes, and the base config.

Recipe files (configs/<recipe>.py) define `get_config(arg)` and build on `base_config()`; they stay
short because sizes and defaults live here, in small tables, instead of being copied per recipe.
`validate(config)` checks every value against its allowed choices before anything compiles.
"""
import ast
import itertools

import ml_collections

from objectives import registry
from objectives.checks import ConfigError, require

MODEL_SIZES = {
    # name: (num_layers, hidden_size, num_heads, mlp_dim)
    "tiny": (2, 64, 2, 256),
    "demo": (4, 256, 4, 1024),
    "small": (4, 512, 8, 2048),
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}

# optimizer.schedule. wsd (warmup-stable-decay) is linear warmup over optimizer.warmup_steps, the
# peak learning rate, then a decay over the last optimizer.decay_fraction of the steps to
# end_learning_rate_factor x peak, shaped by optimizer.decay_shape (DECAY_SHAPES): "linear" is the
# trapezoidal schedule, "1-sqrt" (Hägele et al. 2024) ModernBERT's.
SCHEDULES = ("linear", "cosine", "constant", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")
# jax.random implementations. threefry2x32 gives the same numbers on any mesh; rbg and unsafe_rbg
# (MaxText's choice) draw dropout and masking bits faster but their values depend on the sharding.
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
# What a step whose loss, gradients or update are NaN/inf does (checked on device every step):
# "stop" the run naming the step and the metric, or "skip" the update and count it.
NONFINITE_MODES = ("stop", "skip")
# XLA:CPU's instruction schedulers (xla_cpu_scheduler_type); train.cpu_scheduler picks the step's.
CPU_SCHEDULERS = ("default", "memory_optimized", "concurrency_optimized")
DTYPES = ("float32", "bfloat16")
# train.probe_tasks: pretrain.probes.TASKS (a test holds them equal; configs imports only
# objectives).
PROBE_TASKS = ("exception_type", "docstring_match", "variable_misuse", "swapped_operands",
               "wrong_binary_operator", "docstring_retrieval")
# config.model's architecture choices: pretrain.models.encoder_config's (a test holds them equal;
# configs imports only objectives).
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "geglu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
MLM_HEADS = ("bert", "modernbert")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
TOKENIZER_TYPES = ("unigram", "bpe")
MESH_AXES = ("data", "fsdp", "tensor")
MIXTURE_MODES = ("batch", "row")  # pretrain.data.mixture.MODES (a test holds them equal)
INIT_LAYERS = ("every_k", "first")  # pretrain.interop.student_init.LAYER_CHOICES

# T5X-style defaults: the batch is split over data and fsdp, parameters over fsdp (embed) and tensor.
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),  # the stacked dimension of scanned layers (model.scan_layers), as MaxText
)


def parse_arg(arg, **defaults):
  """Parses `"a=1,b=x,flag"` into a ConfigDict typed like `defaults`; unknown keys are errors."""
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(
          f"Unknown config argument {key!r} in {arg!r}; allowed: {', '.join(sorted(defaults))}.")
    default = defaults[key]
    if not _:  # A bare name switches a boolean on.
      value = True
    elif isinstance(default, str):
      value = raw
    else:
      try:
        value = ast.literal_eval(raw)
      except (ValueError, SyntaxError) as e:
        raise ConfigError(f"Config argument {key}={raw!r} is not a valid {type(default).__name__}.") from e
    if isinstance(default, bool) != isinstance(value, bool) or (
        not isinstance(default, str) and not isinstance(value, type(default))
        and not (isinstance(default, float) and isinstance(value, int))):
      raise ConfigError(
          f"Config argument {key}={raw!r} should be a {type(default).__name__} like {default!r}.")
    result[key] = value
  return result


def product(axes):
  """A sweep's grid: {"a.b": [1, 2], "c": [x]} -> [{"a.b": 1, "c": x}, {"a.b": 2, "c": x}]."""
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def model_config(size):
  """The `config.model` block for one of MODEL_SIZES."""
  if size not in MODEL_SIZES:
    raise ConfigError(f"Unknown model size {size!r}; allowed: {', '.join(MODEL_SIZES)}.")
  num_layers, hidden, heads, mlp = MODEL_SIZES[size]
  return ml_collections.ConfigDict(dict(
      num_layers=num_layers, hidden_size=hidden, num_heads=heads, mlp_dim=mlp,
      max_len=512, dropout_rate=0.1, dtype="float32",
      embedding_size=0,  # 0: as wide as hidden_size; else projected to it (ELECTRA-small: 128)
      # The architecture: BERT's by default; ModernBERT is position=rope, rope_theta=160000,
      # mlp=geglu, pre_norm=True, norm_bias=False, use_bias=False, type_vocab_size=0,
      # local_window=128, mlm_head=modernbert, layer_norm_eps=1e-5 (exported as
      # ModernBertForMaskedLM; other mixes export only the Flax params).
      position="learned",       # POSITIONS: learned absolute table, or rotary (no table; longer
                                # inputs than trained on degrade more gracefully)
      rope_theta=10000.0,       # rotary base of global layers
      rope_local_theta=10000.0,  # rotary base of local (windowed) layers
      mlp="gelu",               # MLPS: gated variants (geglu, swiglu) train better per FLOP
      pre_norm=False,           # norm before each sub-block: stabler training of deep stacks
      norm="layernorm",         # NORMS
      norm_bias=True,           # bias in the norms
      use_bias=True,            # bias in attention, MLP and head dense layers
      type_vocab_size=2,        # token-type rows; 0: none (sentence pairs are not pretrained)
      layer_norm_eps=1e-12,     # of every norm (BERT 1e-12, ModernBERT 1e-5)
      local_window=0,           # > 0: sliding-window attention (|i - j| <= window // 2) in the
                                # layers that are not global: cheaper long sequences
      global_every=3,           # with local_window: layer i is global iff i % global_every == 0
      mlm_head="bert",          # MLM_HEADS: "modernbert" normalises with the model's norm
      attention="xla",          # pretrain.models.attention_kernels: xla, cudnn, pallas_gpu,
                                # splash or auto (per backend); the same outputs, faster kernels
      attention_interpret=False,  # Pallas kernels in interpret mode (tests, CPU dry runs only)
      vocab_multiple=1,         # pad the embedding rows to a multiple (64: faster matmuls);
                                # padded ids are never predicted
      scan_layers=False,        # one compiled layer body (nn.scan), layers stacked in the train
                                # state; exports, imports and init_from see every layer_{i}
      remat="none"))            # REMAT_POLICIES: what each layer keeps for backward (less memory,
                                # more compute; pretrain.models.layers.remat_policy)


def base_config():
  """Every key a run reads, with defaults; recipes override values, never add keys."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.rng_impl = "threefry2x32"    # RNG_IMPLS
  c.threefry_unrolled = False   # CPU: threefry's rounds inline instead of a loop (same bits,
                                # faster dropout and masking, slower compile; training.threefry)
  c.model = model_config("demo")
  c.data = ml_collections.ConfigDict(dict(
      name="python_stdlib",      # local builders: python_stdlib, local_text; pair_files (the
                                 # contrastive view=files); or any TFDS catalog name
      data_dir="data/tfds",      # where TFDS datasets are built or found
      paths="",                  # local_text: comma-separated globs of .txt/.jsonl files;
                                 # pair_files: of .jsonl/.csv/.parquet pair files
      pair_fields="",            # pair_files: "query,positive[,negatives]" ("": detected)
      query_prefix="",           # pair_files: prepended to every query ("query: ", an instruction)
      doc_prefix="",             # pair_files: prepended to every positive and negative
      mixture="",                # pair_files: "name=glob:weight,..." sources in place of paths
      mixture_mode="batch",      # batch: each batch from one source; row: mixed per row
      text_feature="text",
      validation_fraction=0.05,
      train_split="train",
      eval_split="validation",
      seq_len=128,
      batch_size=32,             # global, over all processes
      seed=0,
      tokenizer=ml_collections.ConfigDict(dict(
          path="", vocab_size=16000, model_type="unigram", max_train_bytes=20_000_000,
          # path="" is the default location under data_dir, trained there when missing. A path
          # that does not exist stops the run, so a typo never trains a new tokenizer; train=True
          # trains one at that path instead.
          train=False)),
  ))
  c.objective = ml_collections.ConfigDict(dict(
      name="mlm",
      mask_rate=0.15,
      mask_token_rate=0.8,       # of the selected tokens: replaced by [MASK]
      random_token_rate=0.1,     # ... replaced by a random token; the rest stay unchanged
      whole_word=False,
      # Objective-specific keys come from each objective module's CONFIG (objectives/registry.py).
      **registry.config_defaults(),
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, schedule="linear", warmup_steps=100, end_learning_rate_factor=0.0,
      decay_fraction=0.1, decay_shape="1-sqrt",  # wsd only: its decay phase (SCHEDULES)
      weight_decay=0.01, b1=0.9, b2=0.98, eps=1e-6, grad_clip_norm=1.0, grad_accum_steps=1))
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, log_every=20, eval_every=200, eval_batches=10,
      checkpoint_every=200, keep_checkpoints=3, async_checkpointing=True,
      nonfinite="stop",          # NONFINITE_MODES: stop the run, or skip such updates
      # > 0: the downstream curve, every probe_every steps (a multiple of eval_every) and at the
      # end: linear probes on frozen features and zero-shot retrieval on the held-out stdlib
      # files (pretrain/probes.py), probe_rows examples per split and candidates, from the
      # first probe_max_files files (0: all; tests use a few).
      probe_every=0, probe_tasks="exception_type,docstring_retrieval", probe_rows=1000,
      probe_max_files=0,
      peak_tflops=0.0,           # the MFU's peak per device; 0: the device table, or the measured
                                 # matmul rate on CPU (pretrain/training/flops.py)
      profile_steps="",          # "START:END": a jax.profiler trace of those steps in
                                 # <workdir>/profile (TensorBoard's profile tab or Perfetto)
      # XLA:CPU's scheduler for the train step (CPU_SCHEDULERS; ignored on other backends). The
      # memory-optimised order keeps fewer activations live and computes the same bits; the
      # README's Performance section measures it against XLA's default.
      cpu_scheduler="memory_optimized"))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.axis_rules = DEFAULT_AXIS_RULES
  c.init_from = ""               # a workdir, or a Hugging Face BERT dir, to start from when the
                                 # workdir has no checkpoint
  c.init_from_layers = ""        # "": init_from has this model's shapes; every_k, first or a
                                 # 0-based list "0,2,4": a student cut from the init_from teacher
                                 # (those layers, leading units; pretrain/interop/student_init.py)
  return c


def short_run_cadence(train, steps):
  """`config.train` for a short run of `steps` steps (the demo sizes): about ten log
  lines, three evaluations and three checkpoints."""
  train.update(steps=steps, log_every=max(1, min(20, steps // 10)), eval_every=max(1, steps // 3),
               eval_batches=8, checkpoint_every=max(1, steps // 3))


def validate_optimizer(opt, steps, batch_size):
  """The `config.optimizer` checks that pretraining and fine-tuning share."""
  require(opt.schedule in SCHEDULES, "optimizer.schedule", opt.schedule, ", ".join(SCHEDULES))
  require(opt.learning_rate > 0, "optimizer.learning_rate", opt.learning_rate, "> 0")
  require(0 <= opt.warmup_steps, "optimizer.warmup_steps", opt.warmup_steps, ">= 0")
  require(0 <= opt.end_learning_rate_factor <= 1, "optimizer.end_learning_rate_factor",
          opt.end_learning_rate_factor, "0 <= factor <= 1")
  require(opt.decay_shape in DECAY_SHAPES, "optimizer.decay_shape", opt.decay_shape,
          ", ".join(DECAY_SHAPES))
  require(0 < opt.decay_fraction <= 1, "optimizer.decay_fraction", opt.decay_fraction, "0 < f <= 1")
  if opt.schedule == "wsd" and steps > 0:
    decay = max(1, round(opt.decay_fraction * steps))  # optimizer.wsd_decay_steps
    require(opt.warmup_steps + decay <= steps, "optimizer.decay_fraction", opt.decay_fraction,
            f"0 < f <= 1 with optimizer.warmup_steps + round(f x train.steps) <= train.steps "
            f"({opt.warmup_steps} + {decay} > {steps} here)")
  require(opt.grad_accum_steps >= 1 and batch_size % opt.grad_accum_steps == 0,
          "optimizer.grad_accum_steps", opt.grad_accum_steps,
          f"a divisor of data.batch_size={batch_size}")


def validate(config):
  """Checks values that a locked ConfigDict cannot; raises naming the key and the allowed values."""
  m, d, o, opt, t = config.model, config.data, config.objective, config.optimizer, config.train
  require(o.name in registry.NAMES, "objective.name", o.name, ", ".join(registry.NAMES))
  require(m.dtype in DTYPES, "model.dtype", m.dtype, ", ".join(DTYPES))
  for key in ("num_layers", "hidden_size", "num_heads", "mlp_dim", "max_len"):
    require(m[key] > 0, f"model.{key}", m[key], "a positive integer")
  require(m.hidden_size % m.num_heads == 0, "model.num_heads", m.num_heads,
           f"a divisor of model.hidden_size={m.hidden_size}")
  require(0 <= m.dropout_rate < 1, "model.dropout_rate", m.dropout_rate, "0 <= rate < 1")
  require(d.tokenizer.model_type in TOKENIZER_TYPES, "data.tokenizer.model_type",
           d.tokenizer.model_type, ", ".join(TOKENIZER_TYPES))
  require(d.tokenizer.vocab_size >= 100, "data.tokenizer.vocab_size", d.tokenizer.vocab_size, ">= 100")
  require(8 <= d.seq_len <= m.max_len, "data.seq_len", d.seq_len,
           f"8 <= seq_len <= model.max_len={m.max_len}")
  require(d.batch_size > 0, "data.batch_size", d.batch_size, "a positive integer")
  require(0 < d.validation_fraction < 1, "data.validation_fraction", d.validation_fraction, "0 < f < 1")
  require(0 < o.mask_rate < 1, "objective.mask_rate", o.mask_rate, "0 < rate < 1")
  require(o.mask_token_rate >= 0 and o.random_token_rate >= 0
           and o.mask_token_rate + o.random_token_rate <= 1, "objective.mask_token_rate",
           (o.mask_token_rate, o.random_token_rate), "two rates >= 0 whose sum is <= 1")
  require(m.embedding_size >= 0, "model.embedding_size", m.embedding_size,
           ">= 0 (0 means the same as model.hidden_size)")
  for key, allowed in (("position", POSITIONS), ("mlp", MLPS), ("norm", NORMS),
                       ("mlm_head", MLM_HEADS), ("remat", REMAT_POLICIES)):
    require(m[key] in allowed, f"model.{key}", m[key], ", ".join(allowed))
  require(m.position != "rope" or (m.hidden_size // m.num_heads) % 2 == 0, "model.position",
           m.position, f"learned (rope needs an even head size, got hidden_size / num_heads = "
           f"{m.hidden_size // m.num_heads})")
  for key in ("rope_theta", "rope_local_theta"):
    require(m[key] > 1, f"model.{key}", m[key], "> 1")
  for key in ("type_vocab_size", "local_window"):
    require(m[key] >= 0, f"model.{key}", m[key], ">= 0 (0: none)")
  for key in ("global_every", "vocab_multiple"):
    require(m[key] >= 1, f"model.{key}", m[key], "a positive integer")
  require(m.layer_norm_eps > 0, "model.layer_norm_eps", m.layer_norm_eps, "> 0")
  registry.validate(config)
  require(config.rng_impl in RNG_IMPLS, "rng_impl", config.rng_impl, ", ".join(RNG_IMPLS))
  require(isinstance(config.threefry_unrolled, bool), "threefry_unrolled",
          config.threefry_unrolled, "True or False")
  validate_optimizer(opt, t.steps, d.batch_size)
  for key in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
    require(t[key] > 0, f"train.{key}", t[key], "a positive integer")
  require(t.eval_batches >= 0, "train.eval_batches", t.eval_batches, ">= 0")
  require(t.probe_every >= 0 and t.probe_every % t.eval_every == 0, "train.probe_every",
          t.probe_every, f"0 (off) or a multiple of train.eval_every={t.eval_every}")
  probe_tasks = [s.strip() for s in t.probe_tasks.split(",")]
  require(not t.probe_every or (probe_tasks and set(probe_tasks) <= set(PROBE_TASKS)),
          "train.probe_tasks", t.probe_tasks, "comma-separated, of " + ", ".join(PROBE_TASKS))
  require(t.probe_rows >= 8, "train.probe_rows", t.probe_rows, ">= 8")
  require(t.probe_max_files >= 0, "train.probe_max_files", t.probe_max_files, ">= 0 (0: all)")
  if d.mixture:
    require(d.name == "pair_files" and not d.paths, "data.mixture", d.mixture,
            "'' unless data.name=pair_files with data.paths='' (the mixture names the files)")
  require(d.mixture_mode in MIXTURE_MODES, "data.mixture_mode", d.mixture_mode,
          ", ".join(MIXTURE_MODES))
  require(t.peak_tflops >= 0, "train.peak_tflops", t.peak_tflops, ">= 0 (0: automatic)")
  span = t.profile_steps.split(":")
  require(not t.profile_steps or (len(span) == 2 and all(p.isdigit() for p in span)
                                  and 0 < int(span[0]) < int(span[1])), "train.profile_steps",
          t.profile_steps, "'' or START:END with 0 < START < END (steps START..END-1)")
  require(t.nonfinite in NONFINITE_MODES, "train.nonfinite", t.nonfinite, ", ".join(NONFINITE_MODES))
  require(t.cpu_scheduler in CPU_SCHEDULERS, "train.cpu_scheduler", t.cpu_scheduler,
          ", ".join(CPU_SCHEDULERS))
  layers = config.get("init_from_layers", "")
  require(not layers or (config.init_from and (layers in INIT_LAYERS or all(
      p.strip().isdigit() for p in layers.split(",")))), "init_from_layers", layers,
          f"'' or, with config.init_from set, {', '.join(INIT_LAYERS)} or 0-based teacher layers "
          "like '0,2,4'")
  for axis in MESH_AXES:
    require(config.mesh[axis] == -1 or config.mesh[axis] >= 1, f"mesh.{axis}", config.mesh[axis],
             "-1 (the remaining devices) or a positive integer")
  require(set(config.mesh.keys()) == set(MESH_AXES), "mesh", dict(config.mesh),
           f"exactly the axes {MESH_AXES}")
  return config
