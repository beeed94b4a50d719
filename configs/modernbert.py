"""ModernBERT-class encoder pretraining (Warner et al. 2024): the architecture and its recipe.

  python -m pretrain.main --config=configs/modernbert.py:size=demo --workdir=workdir/modern
  python -m pretrain.main --config=configs/modernbert.py:size=tiny,steps=20 --workdir=/tmp/m
  # Context extension: a second run at 4x the length and a larger global RoPE base, from the first.
  python -m pretrain.main --config=configs/modernbert.py:size=demo,extend --workdir=workdir/modern_long \
      --config.init_from=workdir/modern

Architecture: pre-LN with an embedding norm and a final norm, LayerNorm without bias, no biases in
the dense layers, rotary positions, GeGLU, no token types, sliding-window attention (128 tokens)
in two of every three layers, ModernBERT's MLM head, the vocabulary padded to a multiple of 64;
it exports as `ModernBertForMaskedLM`. Recipe: 30% masking, no dropout, warmup-stable-decay with
a 1-sqrt decay, weight decay 1e-5. ModernBERT's own sizes are base and large; demo and tiny keep
the width of configs/demo.py's sizes with the gated MLP at about the same parameter count
(`gated_width`). `configs/demo.py:arch=<name>` applies one of ARCHITECTURES to the demo recipe
alone, so that only the architecture differs in a comparison.
"""
from configs import common

SIZES = {
    # name: (num_layers, hidden_size, num_heads, mlp_dim of the gated MLP, peak learning rate)
    "tiny": (2, 64, 2, 160, 1e-3),
    "demo": (4, 256, 4, 672, 1e-3),
    "base": (22, 768, 12, 1152, 8e-4),
    "large": (28, 1024, 16, 2624, 5e-4),
}
# The extension phase: ModernBERT went from 1024 to 8192 tokens with the global RoPE base raised
# from 10k to 160k; the demo sizes go 4x longer.
EXTEND_THETA = 160_000.0

# ModernBERT's architecture as config.model keys (the MLP width is the size's own).
MODERN = dict(position="rope", rope_theta=10_000.0, rope_local_theta=10_000.0, mlp="geglu",
              pre_norm=True, norm="layernorm", norm_bias=False, use_bias=False, type_vocab_size=0,
              layer_norm_eps=1e-5, local_window=128, global_every=3, mlm_head="modernbert",
              vocab_multiple=64)
# One change at a time from BERT, and all of them: configs/demo.py:arch=<name> (the comparison
# in bench/architectures.py). A gated MLP has three matrices, so its width is 2/3 of BERT's.
ARCHITECTURES = {
    "bert": {},
    "rope": dict(position="rope"),
    "geglu": dict(mlp="geglu"),
    "prenorm": dict(pre_norm=True),
    "modern": MODERN,
}


def gated_width(mlp_dim):
  """The gated MLP width with about the parameters of a GELU MLP of `mlp_dim` (multiple of 32)."""
  return max(32, round(mlp_dim * 2 / 3 / 32) * 32)


def architecture(name, mlp_dim):
  """config.model keys of ARCHITECTURES[name] for a model whose GELU MLP is `mlp_dim` wide."""
  if name not in ARCHITECTURES:
    raise common.ConfigError(f"Unknown architecture {name!r}; allowed: {', '.join(ARCHITECTURES)}.")
  keys = dict(ARCHITECTURES[name])
  if keys.get("mlp", "gelu") != "gelu":
    keys["mlp_dim"] = gated_width(mlp_dim)
  return keys


def get_config(arg=None):
  a = common.parse_arg(arg, size="demo", steps=600, vocab_size=16000, batch_size=8, seq_len=0,
                       extend=False)
  if a.size not in SIZES:
    raise common.ConfigError(f"Unknown ModernBERT size {a.size!r}; allowed: {', '.join(SIZES)}.")
  layers, hidden, heads, mlp, lr = SIZES[a.size]
  small = a.size in ("tiny", "demo")
  seq_len = a.seq_len or (128 if small else 1024) * (1 if not a.extend else 4 if small else 8)
  c = common.base_config()
  c.model = common.model_config("demo")
  c.model.update(
      num_layers=layers, hidden_size=hidden, num_heads=heads, mlp_dim=mlp,
      max_len=max(512, seq_len), dropout_rate=0.0, **MODERN)
  if a.extend:
    c.model.rope_theta = EXTEND_THETA
  c.data.seq_len = seq_len
  c.data.batch_size = a.batch_size
  c.data.tokenizer.vocab_size = a.vocab_size
  c.data.tokenizer.max_train_bytes = 8_000_000
  c.objective.name = "mlm"
  c.objective.mask_rate = 0.3  # ModernBERT (and Wettig et al. 2023): 30% trains better than 15%.
  c.optimizer.update(
      learning_rate=lr * (0.5 if a.extend else 1.0), schedule="wsd", decay_shape="1-sqrt",
      decay_fraction=0.5 if a.extend else 0.1, warmup_steps=a.steps // (20 if a.extend else 10),
      weight_decay=1e-5, b1=0.9, b2=0.98, eps=1e-6)
  common.short_run_cadence(c.train, a.steps)
  return c
