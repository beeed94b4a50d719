"""Wrong binary operator on held-out stdlib code (CuBERT's classification task): is one operator
replaced by another of its kind?

  python -m pretrain.finetune --config=configs/finetune/wrong_binary_operator.py \
      --config.init=exports/demo --workdir=workdir/ft_wrong_binary_operator

Every function of at most 20 lines with a binary operator appears twice: as it is (label 0) and
with one operator replaced by another of the same kind (arithmetic + - * / // % **, bitwise
| & ^ << >>, comparison == != < <= > >=, is / is not, in / not in, and / or; label 1;
pretrain.finetune.bug_tasks). Same recipe as variable_misuse.py.
"""
from configs.finetune import variable_misuse


def get_config(arg=None):
  return variable_misuse.bug_config("wrong_binary_operator", arg)
