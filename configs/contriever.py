"""Contrastive pretraining on Contriever's random crops or ORQA's ICT (objectives/contrastive.py).

  python -m pretrain.main --config=configs/contriever.py --workdir=workdir/contriever
  python -m pretrain.main --config=configs/contriever.py:loss=moco,queue_size=1024 --workdir=W
  python -m pretrain.main --config=configs/contriever.py:view=ict --workdir=workdir/ict
  python -m pretrain.main --config=configs/contriever.py:view=ccp,loss=moco --workdir=workdir/ccp
  python -m pretrain.main --config=configs/contriever.py:nesting=starbucks,normalize=True ...
  python -m pretrain.main --config=configs/contriever.py:arch=modern --workdir=W \
      --config.init_from=exports/demo      # continue from make demo's MLM (configs/cpu_recipe.py)

Everything but the objective, the batch and the learning rate is configs/demo.py's (model sizes,
`arch=`, data, schedule), so runs compare with the MLM demo at equal settings. Per view the
defaults follow the papers: crop = Contriever (crops of U(0.1, 0.5) of the chunk, token deletion
0.1, mean pooling, dot product, temperature 0.05; MoCo momentum 0.9995); ict = ORQA (query line
removed from its block with probability 0.9, [CLS] -> dense(128) -> LayerNorm, temperature 1,
query length 64);
ccp = CCP (a line or sentence and another within 2 of it; with loss=moco the memory bank; the
query side's embeddings batch-normalised, the paper's asymmetric batch norm).
What differs from the papers: the chunk is data.seq_len tokens (Contriever: 256; ORQA blocks: 288),
the batch is 32 (Contriever: 2048) and the MoCo queue 4096 by default (Contriever: 131,072), the
learning rate is 5e-4 from scratch (Contriever: 5e-5 from BERT; pass learning_rate=5e-5 with an
init_from). In-batch negatives are gathered over every device.
"""
from configs import common, demo

LOSSES = ("infonce", "moco")
# view: (pooler, projection_dim, projection_layer_norm, temperature, query_len)
VIEW_DEFAULTS = {
    "crop": ("mean", 0, False, 0.05, 64),
    "ict": ("cls", 128, True, 1.0, 64),
    "docstring": ("mean", 0, False, 0.05, 64),
    "same_file": ("mean", 0, False, 0.05, 128),
    "ccp": ("mean", 0, False, 0.05, 64),
}


def build(a, views):
  """The config of parsed arguments `a` (see get_config) for a view among `views`."""
  if a.view not in views:
    raise ValueError(f"Unknown view {a.view!r} here; allowed: {', '.join(views)}.")
  if a.loss not in LOSSES:
    raise ValueError(f"Unknown loss {a.loss!r}; allowed: {', '.join(LOSSES)}.")
  c = demo.get_config(f"size={a.size},steps={a.steps},vocab_size={a.vocab_size},"
                      f"batch_size={a.batch_size},seq_len={a.seq_len},arch={a.arch}")
  pooler, projection, projection_norm, temperature, query_len = VIEW_DEFAULTS[a.view]
  c.objective.update(
      name="contrastive", view=a.view, contrastive_loss=a.loss, pooler=a.pooler or pooler,
      projection_dim=projection, projection_layer_norm=projection_norm,
      temperature=a.temperature or temperature, query_len=min(query_len, a.seq_len),
      normalize=a.normalize, nesting=a.nesting, symmetric=a.symmetric,
      queue_size=a.queue_size or max(4096 // a.batch_size, 1) * a.batch_size,
      moco_momentum=a.moco_momentum)
  c.optimizer.learning_rate = a.learning_rate
  return c


def get_config(arg=None):
  a = common.parse_arg(arg, view="crop", loss="infonce", pooler="", nesting="none",
                       normalize=False, symmetric=False, temperature=0.0, size="demo", steps=600,
                       vocab_size=16000, batch_size=32, seq_len=128, learning_rate=5e-4,
                       queue_size=0, moco_momentum=0.9995, arch="bert")
  c = build(a, ("crop", "ict", "ccp"))
  if a.view == "ccp":  # CCP: a memory bank (MoCo's queue) and the asymmetric batch norm.
    c.objective.query_batch_norm = True
  return c
