"""ELECTRA replaced-token detection, and its generator-free relatives RTS, C-RTS and SLM.

  python -m pretrain.main --config=configs/electra.py:size=small --workdir=workdir/electra-small
  python -m pretrain.main --config=configs/electra.py:size=base,data=wikipedia/20230601.en ...
  python -m pretrain.main --config=configs/electra.py:size=tiny,objective=crts,steps=20 \
      --workdir=/tmp/w

Sizes and optimizer follow the ELECTRA paper (Table 6) and its official code: AdamW (b2 0.999,
eps 1e-6, weight decay 0.01), linear warmup over 10k steps then linear decay to 0, clip 1.0.
`steps`, `batch_size` and `seq_len` of 0 take the size's value. `tiny` is what the tests use.
Differences from the paper: no attention-probability dropout (our encoder has none), and the
vocabulary is our sentencepiece model of the data (the paper: BERT's 30522 WordPiece).
"""
from configs import common

# name: (num_layers, hidden_size, num_heads, mlp_dim, embedding_size (0 = hidden_size), max_len)
SIZES = {
    "tiny": (2, 64, 2, 256, 32, 128),
    "small": (12, 256, 4, 1024, 128, 512),
    "base": (12, 768, 12, 3072, 0, 512),
}
# name: (learning_rate, warmup_steps, batch_size, seq_len, steps, generator_size_fraction)
RECIPES = {
    "tiny": (1e-3, 10, 8, 32, 100, 0.25),
    "small": (5e-4, 10_000, 128, 128, 1_000_000, 0.25),
    "base": (2e-4, 10_000, 256, 512, 766_000, 1 / 3),
}
# What happens to the selected 15%: (mask_token_rate, random_token_rate). ELECTRA: 85% [MASK],
# 15% unchanged; the others replace every selected token (their objectives do so whatever is set).
CORRUPTION = {"electra": (0.85, 0.0), "rts": (0.0, 1.0), "crts": (0.0, 1.0), "slm": (0.0, 1.0)}


def get_config(arg=None):
  a = common.parse_arg(arg, size="small", objective="electra", data="python_stdlib", steps=0,
                       batch_size=0, seq_len=0, vocab_size=16000, whole_word=False)
  if a.size not in SIZES:
    raise ValueError(f"Unknown ELECTRA size {a.size!r}; allowed: {', '.join(SIZES)}.")
  if a.objective not in CORRUPTION:
    raise ValueError(f"Unknown objective {a.objective!r} for configs/electra.py; allowed: "
                     f"{', '.join(CORRUPTION)}.")
  layers, hidden, heads, mlp, embedding, max_len = SIZES[a.size]
  lr, warmup, batch_size, seq_len, steps, fraction = RECIPES[a.size]
  steps, batch_size, seq_len = a.steps or steps, a.batch_size or batch_size, a.seq_len or seq_len

  c = common.base_config()
  c.model.update(num_layers=layers, hidden_size=hidden, num_heads=heads, mlp_dim=mlp,
                 embedding_size=embedding, max_len=max(max_len, seq_len))
  c.data.update(name=a.data, seq_len=seq_len, batch_size=batch_size)
  c.data.tokenizer.vocab_size = a.vocab_size
  mask_token_rate, random_token_rate = CORRUPTION[a.objective]
  c.objective.update(name=a.objective, mask_rate=0.15, mask_token_rate=mask_token_rate,
                     random_token_rate=random_token_rate, whole_word=a.whole_word,
                     generator_size_fraction=fraction, generator_weight=1.0,
                     discriminator_weight=50.0)
  c.optimizer.update(learning_rate=lr, schedule="linear", warmup_steps=min(warmup, steps // 10),
                     end_learning_rate_factor=0.0, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6,
                     grad_clip_norm=1.0)
  if a.size == "tiny":
    c.train.update(steps=steps, log_every=max(1, steps // 10), eval_every=max(1, steps // 2),
                   eval_batches=2, checkpoint_every=max(1, steps // 2))
  else:
    c.train.update(steps=steps, log_every=100, eval_every=10_000, eval_batches=50,
                   checkpoint_every=5_000)
  return c
