"""Function-docstring match on held-out stdlib code: does this docstring belong to this function?

  python -m pretrain.finetune --config=configs/finetune/docstring_match.py \
      --config.init=exports/demo --workdir=workdir/ft_docstring
  # Bi-encoder retrieval instead (MRR of each docstring against every held-out function):
  python -m pretrain.finetune --config=configs/finetune/docstring_match.py:head=biencoder \
      --config.init=exports/demo --workdir=workdir/ft_retrieval

head=sequence: [CLS] docstring [SEP] code [SEP] (128 tokens), label 1 for the function's own code
and 0 for another function's (one of each per documented function); accuracy and F1.
head=biencoder: docstring and code encoded apart (64 tokens each), mean-pooled, in-batch
negatives; MRR of each held-out docstring among all ~2,000 held-out functions. `steps=0` scores
the pretrained embeddings as they are (zero-shot).
"""
from configs import common as pre_common
from configs.finetune import common


def get_config(arg=None):
  a = pre_common.parse_arg(arg, head="sequence", steps=200, batch_size=0, seq_len=0, lr=3e-4)
  biencoder = a.head == "biencoder"
  c = common.base_config()
  c.task.head = a.head
  c.data.source = "docstring_retrieval" if biencoder else "docstring_match"
  c.task.pooling = "mean"  # MLM never trains the [CLS] state.
  # A pair row holds docstring + code; a bi-encoder row one of them (and 32 in-batch candidates).
  c.data.seq_len = a.seq_len or (64 if biencoder else 128)
  c.data.batch_size = a.batch_size or (32 if biencoder else 16)
  return common.set_schedule(c, a.steps, a.lr, layer_decay=0.9)
