"""Variable misuse on held-out stdlib code (CuBERT's classification task): is a variable misused?

  python -m pretrain.finetune --config=configs/finetune/variable_misuse.py \
      --config.init=exports/demo --workdir=workdir/ft_variable_misuse

Every function of at most 20 lines with a local variable use that another local variable (a
parameter or a name assigned on an earlier line) can replace appears twice: as it is (label 0,
"correct") and with that one use replaced (label 1, "buggy"; pretrain.finetune.bug_tasks), so the
classes are balanced. 256 tokens hold the whole function for 99% of them. Train/dev from the
pretraining train files (at most 10,000 / 250 functions), test from every held-out file.
`bug_config` is the recipe of all three bug tasks (swapped_operands.py, wrong_binary_operator.py).

`:head=locate` also locates the bug (CuBERT's localisation task, after Vasic et al. 2019): a
pointer over the row's positions picks the first token of the edited site in a buggy function and
[CLS] in a correct one. results.json then has localization_accuracy (buggy rows pointed at their
bug), joint_accuracy (every row exactly right), the bug/no-bug accuracy and f1 read off the
pointer, and the pairs dropped because the site lies past data.seq_len. Default head=sequence.
"""
from configs import common as pre_common
from configs.finetune import common


def bug_config(source, arg=None):
  """The recipe of a bug task: sequence classification of [CLS] function [SEP], mean pooling; or
  (head=locate) a pointer at the bug's first token."""
  a = pre_common.parse_arg(arg, head="sequence", steps=300, batch_size=16, seq_len=256, lr=3e-4)
  pre_common.require(a.head in ("sequence", "locate"), "head", a.head, "sequence, locate")
  c = common.base_config()
  c.data.source = source
  c.data.seq_len = a.seq_len
  c.data.batch_size = a.batch_size
  c.task.head = a.head
  c.task.pooling = "mean"  # MLM never trains the [CLS] state.
  return common.set_schedule(c, a.steps, a.lr, layer_decay=0.9)


def get_config(arg=None):
  return bug_config("variable_misuse", arg)
