"""Any task from local JSONL / CSV files (or a TFDS dataset) with one of the three heads.

  # Sentence(-pair) classification: {"text": ..., ["text_b": ...,] "label": ...} per line.
  python -m pretrain.finetune --config=configs/finetune/jsonl.py --config.init=exports/demo \
      --workdir=workdir/ft_mine --config.data.train='data/mine/train.jsonl' \
      --config.data.dev='data/mine/dev.jsonl' --config.data.test='data/mine/test.jsonl'
  # Token classification: {"tokens": [...], "tags": [...]}; retrieval: {"query": ..., "doc": ...}.
  python -m pretrain.finetune --config=configs/finetune/jsonl.py:head=token ...
  # A prepared TFDS catalog dataset (never downloaded here):
  python -m pretrain.finetune --config=configs/finetune/jsonl.py --config.data.source=tfds \
      --config.data.name=glue/sst2 --config.data.text_field=sentence \
      --config.data.train=train --config.data.dev=validation --config.init=...

Labels may be strings (sorted into classes) or integers 0..C-1 (each with a training row);
--config.task.labels=neg,pos declares the classes instead, and then any other label is an error.
Without data.dev, 10% of the training rows (by hash) are held out; without data.test, the dev set
is reported as test. Every row is checked before anything compiles: a bad one is one error line
naming its file:line, what is wrong and the fix (pretrain/finetune/task_files.py).
"""
from configs import common as pre_common
from configs.finetune import common


def get_config(arg=None):
  a = pre_common.parse_arg(arg, head="sequence", steps=1000, batch_size=32, seq_len=128, lr=1e-4)
  c = common.base_config()
  c.task.head = a.head
  c.task.pooling = "mean" if a.head == "biencoder" else "cls"
  c.data.source = "files"
  c.data.seq_len = a.seq_len
  c.data.batch_size = a.batch_size
  common.set_schedule(c, a.steps, a.lr, evals=5)
  return c
