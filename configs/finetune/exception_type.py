"""Exception-type classification on held-out stdlib code: which exception does this clause catch?

  python -m pretrain.finetune --config=configs/finetune/exception_type.py \
      --config.init=exports/demo --workdir=workdir/ft_exception
  # Task distillation (Well-Read Students): a student trained on that run's soft predictions.
  python -m pretrain.finetune --config=configs/finetune/exception_type.py \
      --config.init=workdir/small --config.teacher=workdir/ft_exception --workdir=workdir/student

Each `except Name:` clause of the standard library becomes its try statement with the name
replaced by [MASK] (a window of at most ~13 lines: 64 tokens hold most of it); the label is the
name among the 20 most frequent types (others dropped). 300 steps of 32 are ~2.8 epochs.
Train/dev from the pretraining train files, test from the held-out files (pretrain.finetune.tasks).
"""
from configs import common as pre_common
from configs.finetune import common


def get_config(arg=None):
  a = pre_common.parse_arg(arg, steps=300, batch_size=32, seq_len=64, lr=3e-4, num_types=20)
  c = common.base_config()
  c.data.source = "exception_type"
  c.data.seq_len = a.seq_len
  c.data.batch_size = a.batch_size
  c.data.num_exception_types = a.num_types
  c.task.head = "sequence"
  # Mean pooling: MLM never trains the [CLS] state, which a short fine-tuning barely moves.
  c.task.pooling = "mean"
  return common.set_schedule(c, a.steps, a.lr, layer_decay=0.9)

